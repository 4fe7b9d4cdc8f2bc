/* The ceiling over a compute-bound call: the most float32 multiply-adds T threads can issue.
 *
 *     cc -O2 -mavx512f -pthread benches/peak_flops.c -o peak_flops && ./peak_flops THREADS
 *     (-mavx2 -mfma for the AVX2 figure)
 *
 * prints the best GFLOP/s (an FMA counts two) of many rounds in which every thread runs independent FMA
 * chains on registers only: no loads, no stores, nothing else. No GEMM, and so no batch LSTM, can run
 * faster on these threads; peers.py compiles this and prints what fraction of it a batch target asks for.
 * Twelve chains hide the FMA latency (4 cycles on the cores seen) on two FMA pipes, with room to spare.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "spin_barrier.h"

enum { ROUNDS = 20, ITERS = 2000000, CHAINS = 12 };

#ifdef __AVX512F__
typedef __m512 vec;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#else
typedef __m256 vec;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#endif
#define LANES ((int)(sizeof(vec) / sizeof(float)))

static long nthreads;
static atomic_long arrived;  /* every round starts with all threads running */
static double best = 1e30;
static volatile float sink;

static void* worker(void* arg) {
    long generation = 0;
    int first = arg == 0;
    /* Values that stay finite for ITERS rounds of x = x * m + a (m < 1): no denormals, no infinities. */
    vec m = SET1(0.999999f), add = SET1(1e-6f);
    for (int round = 0; round < ROUNDS; round++) {
        /* Named chains, not an array: the compiler keeps each in a register. */
        vec c0 = SET1(1), c1 = SET1(2), c2 = SET1(3), c3 = SET1(4), c4 = SET1(5), c5 = SET1(6);
        vec c6 = SET1(7), c7 = SET1(8), c8 = SET1(9), c9 = SET1(10), c10 = SET1(11), c11 = SET1(12);
        barrier(&arrived, nthreads, &generation);
        double t0 = first ? now() : 0;
        for (long i = 0; i < ITERS; i++) {
            c0 = FMA(c0, m, add); c1 = FMA(c1, m, add); c2 = FMA(c2, m, add); c3 = FMA(c3, m, add);
            c4 = FMA(c4, m, add); c5 = FMA(c5, m, add); c6 = FMA(c6, m, add); c7 = FMA(c7, m, add);
            c8 = FMA(c8, m, add); c9 = FMA(c9, m, add); c10 = FMA(c10, m, add); c11 = FMA(c11, m, add);
        }
        barrier(&arrived, nthreads, &generation);  /* every thread has issued its share */
        if (first && now() - t0 < best) best = now() - t0;
        vec sum = ADD(ADD(ADD(c0, c1), ADD(c2, c3)), ADD(ADD(c4, c5), ADD(c6, c7)));
        sum = ADD(sum, ADD(ADD(c8, c9), ADD(c10, c11)));
        float out[LANES];
        memcpy(out, &sum, sizeof out);  /* the chains are used: none is left out */
        sink = out[0];
    }
    return NULL;
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s THREADS\n", argv[0]);
        return 2;
    }
    long threads = atol(argv[1]);
    if (threads < 1 || threads > 256) {
        fprintf(stderr, "1 <= THREADS <= 256\n");
        return 2;
    }
    nthreads = threads;
    pthread_t tid[256];
    for (long t = 1; t < threads; t++) pthread_create(&tid[t], NULL, worker, (void*)t);
    worker((void*)0);
    for (long t = 1; t < threads; t++) pthread_join(tid[t], NULL);
    printf("%.1f\n", 2.0 * LANES * CHAINS * (double)ITERS * threads / best * 1e-9);
    return 0;
}
