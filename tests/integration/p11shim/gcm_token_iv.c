/*
 * A PKCS#11 module for tests: SoftHSM2 behind it, with AWS CloudHSM's documented
 * AES-GCM behaviour in front. On C_EncryptInit with CKM_AES_GCM it ignores the IV in
 * CK_GCM_PARAMS, generates its own and writes it into the caller's pIv buffer, then
 * lets SoftHSM encrypt with it. Everything else goes to SoftHSM untouched.
 *
 * KEYBROKER_SHIM_TARGET  path of the real module (libsofthsm2.so)
 * KEYBROKER_SHIM_IV      "random" (default): 12 fresh bytes from getrandom(2) each time;
 *                        "fixed": the same 12 bytes each time (a broken generator);
 *                        "long": 16 bytes written into a 12-byte IV (an overrun).
 *
 * Self-contained on purpose (no PKCS#11 headers needed): only the few PKCS#11 2.40
 * types it touches are declared, in the Unix ABI.
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef struct { unsigned char major, minor; } CK_VERSION;
typedef struct { CK_ULONG mechanism; void *pParameter; CK_ULONG ulParameterLen; } CK_MECHANISM;
typedef struct {
    unsigned char *pIv; CK_ULONG ulIvLen; CK_ULONG ulIvBits;
    unsigned char *pAAD; CK_ULONG ulAADLen; CK_ULONG ulTagBits;
} CK_GCM_PARAMS;
/* CK_FUNCTION_LIST 2.40: a version then 68 function pointers; C_EncryptInit is the 30th. */
#define FUNCTIONS 68
#define ENCRYPT_INIT 29
typedef struct { CK_VERSION version; void *fn[FUNCTIONS]; } FUNCTION_LIST;
typedef CK_RV (*get_list_fn)(FUNCTION_LIST **);
typedef CK_RV (*encrypt_init_fn)(CK_ULONG, CK_MECHANISM *, CK_ULONG);

#define CKR_OK 0UL
#define CKR_GENERAL_ERROR 5UL
#define CKM_AES_GCM 0x1087UL

static FUNCTION_LIST shim_list;
static encrypt_init_fn real_encrypt_init;

static CK_RV shim_encrypt_init(CK_ULONG session, CK_MECHANISM *mech, CK_ULONG key) {
    if (mech && mech->mechanism == CKM_AES_GCM && mech->pParameter &&
        mech->ulParameterLen == sizeof(CK_GCM_PARAMS)) {
        CK_GCM_PARAMS *p = (CK_GCM_PARAMS *)mech->pParameter;
        const char *mode = getenv("KEYBROKER_SHIM_IV");
        if (p->pIv == NULL || p->ulIvLen != 12) return CKR_GENERAL_ERROR;
        if (mode && strcmp(mode, "fixed") == 0) {
            memset(p->pIv, 0x5a, 12);
        } else if (mode && strcmp(mode, "long") == 0) {
            if (getrandom(p->pIv, 16, 0) != 16) return CKR_GENERAL_ERROR;
        } else if (getrandom(p->pIv, 12, 0) != 12) {
            return CKR_GENERAL_ERROR;
        }
    }
    return real_encrypt_init(session, mech, key);
}

CK_RV C_GetFunctionList(FUNCTION_LIST **out) {
    const char *target = getenv("KEYBROKER_SHIM_TARGET");
    void *handle;
    get_list_fn get_list;
    FUNCTION_LIST *real;
    if (out == NULL || target == NULL) return CKR_GENERAL_ERROR;
    handle = dlopen(target, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) return CKR_GENERAL_ERROR;
    get_list = (get_list_fn)dlsym(handle, "C_GetFunctionList");
    if (get_list == NULL || get_list(&real) != CKR_OK) return CKR_GENERAL_ERROR;
    memcpy(&shim_list, real, sizeof(shim_list));
    real_encrypt_init = (encrypt_init_fn)real->fn[ENCRYPT_INIT];
    shim_list.fn[ENCRYPT_INIT] = (void *)shim_encrypt_init;
    *out = &shim_list;
    return CKR_OK;
}
