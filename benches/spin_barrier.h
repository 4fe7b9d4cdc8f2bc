/* What benches/read_floor.c and benches/peak_flops.c share: a monotonic clock and a spinning barrier
 * (a sleeping one would time its own wake-up too). Each program is one file; this is included, not linked. */
#pragma once
#include <immintrin.h>
#include <stdatomic.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Every one of `nthreads` callers waits here until all have arrived; `generation` is the caller's own count
 * of barriers passed, so one counter serves every round. */
static void barrier(atomic_long* arrived, long nthreads, long* generation) {
    long target = ++*generation * nthreads;
    atomic_fetch_add(arrived, 1);
    while (atomic_load(arrived) < target) _mm_pause();
}
