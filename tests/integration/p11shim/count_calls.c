/*
 * A PKCS#11 module for tests: SoftHSM2 behind it, unchanged, with two things noted in a
 * file the test reads: the flags C_Initialize was given ("init <flags>", or "init null"
 * for no arguments, which promises the library single-threaded use) and every object
 * search ("find", one per C_FindObjectsInit).
 *
 * KEYBROKER_SHIM_TARGET  path of the real module (libsofthsm2.so)
 * KEYBROKER_SHIM_LOG     file the notes are appended to (one per line)
 *
 * Self-contained (no PKCS#11 headers): only the PKCS#11 2.40 layout it touches, Unix ABI.
 */
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef unsigned long CK_ULONG;
typedef CK_ULONG CK_RV;
typedef struct { unsigned char major, minor; } CK_VERSION;
typedef struct {
    void *CreateMutex, *DestroyMutex, *LockMutex, *UnlockMutex;
    CK_ULONG flags;
    void *pReserved;
} CK_C_INITIALIZE_ARGS;
/* CK_FUNCTION_LIST 2.40: a version then 68 function pointers in the standard's order. */
#define FUNCTIONS 68
#define INITIALIZE 0
#define FIND_OBJECTS_INIT 26
typedef struct { CK_VERSION version; void *fn[FUNCTIONS]; } FUNCTION_LIST;
typedef CK_RV (*get_list_fn)(FUNCTION_LIST **);
typedef CK_RV (*initialize_fn)(void *);
typedef CK_RV (*find_init_fn)(CK_ULONG, void *, CK_ULONG);

#define CKR_OK 0UL
#define CKR_GENERAL_ERROR 5UL

static FUNCTION_LIST shim_list;
static initialize_fn real_initialize;
static find_init_fn real_find_init;

static void note(const char *line) {
    const char *path = getenv("KEYBROKER_SHIM_LOG");
    int fd;
    if (path == NULL) return;
    /* One write(2) per line with O_APPEND: lines from parallel threads never interleave. */
    fd = open(path, O_WRONLY | O_APPEND | O_CREAT, 0600);
    if (fd < 0) return;
    if (write(fd, line, strlen(line)) < 0) { /* a lost note fails the test that reads it */ }
    close(fd);
}

static CK_RV shim_initialize(void *args) {
    char line[64];
    if (args == NULL) {
        note("init null\n");
    } else {
        snprintf(line, sizeof line, "init %lu\n", ((CK_C_INITIALIZE_ARGS *)args)->flags);
        note(line);
    }
    return real_initialize(args);
}

static CK_RV shim_find_init(CK_ULONG session, void *templ, CK_ULONG count) {
    note("find\n");
    return real_find_init(session, templ, count);
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
    real_initialize = (initialize_fn)real->fn[INITIALIZE];
    real_find_init = (find_init_fn)real->fn[FIND_OBJECTS_INIT];
    shim_list.fn[INITIALIZE] = (void *)shim_initialize;
    shim_list.fn[FIND_OBJECTS_INIT] = (void *)shim_find_init;
    *out = &shim_list;
    return CKR_OK;
}
