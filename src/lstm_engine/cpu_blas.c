/* OpenBLAS thread counts, which the Python side holds to the engine's own around BLAS calls. */
#define _GNU_SOURCE
#include "_cpu_impl.h"

#include <dlfcn.h>
#include <link.h>
#include <string.h>

/* -- BLAS threads -------------------------------------------------------------------------- */

/* The OpenBLAS builds loaded in this process (SciPy's, which the kernels call, and NumPy's, which
 * Dense layers use), found by name among the loaded libraries. OpenBLAS's thread count is
 * process-wide (its "_local" setter is too, in pthreads builds), so a limit is set around a call
 * and restored after it. */
#define MAX_BLAS 4
static struct {
    int n;
    void (*set[MAX_BLAS])(int);
    int (*get[MAX_BLAS])(void);
} blas;

static int find_openblas(struct dl_phdr_info *info, size_t size, void *data)
{
    static const char *set_names[] = {"scipy_openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
                                      "openblas_set_num_threads", "openblas_set_num_threads64_"};
    static const char *get_names[] = {"scipy_openblas_get_num_threads", "scipy_openblas_get_num_threads64_",
                                      "openblas_get_num_threads", "openblas_get_num_threads64_"};
    (void)size;
    (void)data;
    if (blas.n >= MAX_BLAS || !info->dlpi_name || !strstr(info->dlpi_name, "openblas"))
        return 0;
    void *lib = dlopen(info->dlpi_name, RTLD_LAZY | RTLD_NOLOAD);
    if (!lib)
        return 0;
    for (int i = 0; i < 4; i++) {
        void *set = dlsym(lib, set_names[i]);
        void *get = dlsym(lib, get_names[i]);
        if (set && get) {
            *(void **)&blas.set[blas.n] = set;
            *(void **)&blas.get[blas.n] = get;
            blas.n++;
            break;
        }
    }
    /* The library stays loaded by whoever loaded it; this handle only bumped its count. */
    dlclose(lib);
    return 0;
}

int le_blas_bind(void)
{
    blas.n = 0;
    dl_iterate_phdr(find_openblas, NULL);
    return blas.n;
}

int le_blas_threads(void)
{
    int most = 0;
    for (int i = 0; i < blas.n; i++) {
        int t = blas.get[i]();
        most = t > most ? t : most;
    }
    return most;
}

void le_blas_set_threads(int n)
{
    for (int i = 0; i < blas.n; i++)
        blas.set[i](n);
}
