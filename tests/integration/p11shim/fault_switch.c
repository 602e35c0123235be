/*
 * A PKCS#11 module for tests: SoftHSM2 behind it, with a fault switch in front. While
 * the file named by KEYBROKER_SHIM_FAULT_FILE exists, C_GenerateKey (new secret-key
 * material: a rotation of an AES key) and C_DestroyObject (removing material at the end
 * of a destruction window) answer CKR_DEVICE_ERROR, as a failing HSM does; once the file
 * is gone they reach SoftHSM again. Everything else goes to SoftHSM untouched (so the
 * broker's audit signer, which makes key pairs, keeps working).
 *
 * KEYBROKER_SHIM_TARGET      path of the real module (libsofthsm2.so)
 * KEYBROKER_SHIM_FAULT_FILE  path whose existence turns the fault on
 *
 * Self-contained on purpose (no PKCS#11 headers needed): only the few PKCS#11 2.40
 * types it touches are declared, in the Unix ABI.
 */
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef struct { unsigned char major, minor; } CK_VERSION;
/* CK_FUNCTION_LIST 2.40: a version then 68 function pointers. */
#define FUNCTIONS 68
#define DESTROY_OBJECT 22
#define GENERATE_KEY 58
typedef struct { CK_VERSION version; void *fn[FUNCTIONS]; } FUNCTION_LIST;
typedef CK_RV (*get_list_fn)(FUNCTION_LIST **);
typedef CK_RV (*generate_key_fn)(CK_ULONG, void *, void *, CK_ULONG, CK_ULONG *);
typedef CK_RV (*destroy_object_fn)(CK_ULONG, CK_ULONG);

#define CKR_OK 0UL
#define CKR_GENERAL_ERROR 5UL
#define CKR_DEVICE_ERROR 0x30UL

static FUNCTION_LIST shim_list;
static generate_key_fn real_generate_key;
static destroy_object_fn real_destroy_object;

static int faulty(void) {
    const char *switch_file = getenv("KEYBROKER_SHIM_FAULT_FILE");
    return switch_file != NULL && access(switch_file, F_OK) == 0;
}

static CK_RV shim_generate_key(CK_ULONG session, void *mech, void *tmpl, CK_ULONG count, CK_ULONG *key) {
    if (faulty()) return CKR_DEVICE_ERROR;
    return real_generate_key(session, mech, tmpl, count, key);
}

static CK_RV shim_destroy_object(CK_ULONG session, CK_ULONG object) {
    if (faulty()) return CKR_DEVICE_ERROR;
    return real_destroy_object(session, object);
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
    real_generate_key = (generate_key_fn)real->fn[GENERATE_KEY];
    real_destroy_object = (destroy_object_fn)real->fn[DESTROY_OBJECT];
    shim_list.fn[GENERATE_KEY] = (void *)shim_generate_key;
    shim_list.fn[DESTROY_OBJECT] = (void *)shim_destroy_object;
    *out = &shim_list;
    return CKR_OK;
}
