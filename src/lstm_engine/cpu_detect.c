/* Which kernel variant runs on this CPU, and how many cores this process may use. */
#define _GNU_SOURCE
#include "_cpu_impl.h"

#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *const names[LE_NUM_VARIANTS] = {"portable", "avx2", "avx512"};
static const char *reasons[LE_NUM_VARIANTS];
static int detected = -1;
static int forced = -1;

static void detect(void)
{
    if (detected >= 0)
        return;
    reasons[LE_PORTABLE] = "baseline x86-64 C, runs everywhere";
    detected = LE_PORTABLE;
#ifdef LE_X86
    /* GCC's checks include the OS saving the YMM/ZMM registers (XGETBV), not just CPUID. */
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2"))
        reasons[LE_AVX2] = "the CPU lacks AVX2";
    else if (!__builtin_cpu_supports("fma"))
        reasons[LE_AVX2] = "the CPU lacks FMA";
    else {
        reasons[LE_AVX2] = "the CPU has AVX2 and FMA";
        detected = LE_AVX2;
    }
    if (detected < LE_AVX2)
        reasons[LE_AVX512] = "the CPU lacks AVX2/FMA, and AVX-512";
    else if (!__builtin_cpu_supports("avx512f"))
        reasons[LE_AVX512] = "the CPU (or the OS) lacks AVX-512F";
    else if (!__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512bw")
             || !__builtin_cpu_supports("avx512dq"))
        reasons[LE_AVX512] = "the CPU has AVX-512F but lacks VL, BW or DQ";
    else {
        reasons[LE_AVX512] = "the CPU has AVX-512 F/VL/BW/DQ";
        detected = LE_AVX512;
    }
#else
    reasons[LE_AVX2] = "not an x86 CPU";
    reasons[LE_AVX512] = "not an x86 CPU";
#endif
}

int le_simd_detected(void)
{
    detect();
    return detected;
}

int le_simd_forced(void)
{
    return forced;
}

int le_simd_level(void)
{
    return forced >= 0 ? forced : le_simd_detected();
}

int le_set_simd_level(int level)
{
    if (level >= LE_NUM_VARIANTS || level > le_simd_detected())
        return -1;
    forced = level < 0 ? -1 : level;
    return 0;
}

const char *le_simd_name(int level)
{
    return level >= 0 && level < LE_NUM_VARIANTS ? names[level] : "unknown";
}

const char *le_simd_reason(int level)
{
    detect();
    return level >= 0 && level < LE_NUM_VARIANTS ? reasons[level] : "no such variant";
}

const le_variant *le_variant_in_use(void)
{
#ifdef LE_X86
    switch (le_simd_level()) {
    case LE_AVX512:
        return &le_variant_avx512;
    case LE_AVX2:
        return &le_variant_avx2;
    }
#endif
    return &le_variant_portable;
}

/* -- cores --------------------------------------------------------------------------------- */

static char count_reason[160];

/* cgroup v2 "max 100000" or "150000 100000"; v1 cfs_quota_us / cfs_period_us. 0 when unlimited. */
static int cgroup_cpus(void)
{
    long quota = -1, period = 0;
    FILE *f = fopen("/sys/fs/cgroup/cpu.max", "r");
    if (f) {
        char q[32];
        if (fscanf(f, "%31s %ld", q, &period) == 2 && strcmp(q, "max") != 0)
            quota = atol(q);
        fclose(f);
    } else if ((f = fopen("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "r"))) {
        if (fscanf(f, "%ld", &quota) != 1)
            quota = -1;
        fclose(f);
        if ((f = fopen("/sys/fs/cgroup/cpu/cpu.cfs_period_us", "r"))) {
            if (fscanf(f, "%ld", &period) != 1)
                period = 0;
            fclose(f);
        }
    }
    if (quota <= 0 || period <= 0)
        return 0;
    long n = (quota + period - 1) / period;
    return n < 1 ? 1 : (int)n;
}

/* The calling thread's affinity mask, or the cores online (affine = 0) where it cannot be read. */
static int affinity_cores(int *affine)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        *affine = 1;
        return CPU_COUNT(&set);
    }
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    *affine = 0;
    return online > 0 ? (int)online : 1;
}

int le_usable_cores(void)
{
    int affine, n = affinity_cores(&affine), quota = cgroup_cpus();
    return quota && quota < n ? quota : n;
}

int le_cpu_count(void)
{
    int affine, n = affinity_cores(&affine);
    if (affine)
        snprintf(count_reason, sizeof count_reason, "%d core(s) in the process's affinity mask", n);
    else
        snprintf(count_reason, sizeof count_reason, "%d core(s) online", n);
    int quota = cgroup_cpus();
    if (quota && quota < n) {
        n = quota;
        snprintf(count_reason, sizeof count_reason, "the cgroup's CPU quota allows %d core(s)", n);
    }
    const char *omp = getenv("OMP_NUM_THREADS");
    if (omp && *omp) {
        /* Its first number (a nested list "4,2" gives the outer level). */
        long want = strtol(omp, NULL, 10);
        if (want >= 1 && want < n) {
            n = (int)want;
            snprintf(count_reason, sizeof count_reason, "OMP_NUM_THREADS=%d", n);
        }
    }
    return n;
}

const char *le_cpu_count_reason(void)
{
    if (!count_reason[0])
        le_cpu_count();
    return count_reason;
}
