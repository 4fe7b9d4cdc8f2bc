/* The floor under a memory-bound step: the best time to read N bytes once with T threads.
 *
 *     cc -O2 -mavx2 -pthread benches/read_floor.c -o read_floor && ./read_floor BYTES THREADS
 *     (-mavx512f on a CPU that has it: the wider loads read faster from L1 and L2)
 *
 * prints the best of many barrier-timed reads, in microseconds. A batch-1 step reads every weight of
 * its layers once and does little else, so no engine runs it faster than this read of the same bytes
 * (peers.py compiles this and prints the floor beside the workloads whose targets lie near or under it).
 * The buffer is read again and again: what fits in the cores' caches is timed from there, as a step
 * that runs again finds it, in the engine's order (below).
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "spin_barrier.h"

enum { ROUNDS = 300, CHUNK = 256 };

static char* buf;
static size_t part;  /* bytes per thread, a multiple of CHUNK */
static long nthreads;
static atomic_long arrived;
static double best = 1e30;
static volatile float sink;

#ifdef __AVX512F__
typedef __m512 vec;
#define ZERO _mm512_setzero_ps
#define LOAD _mm512_load_ps
#define ADD _mm512_add_ps
#else
typedef __m256 vec;
#define ZERO _mm256_setzero_ps
#define LOAD _mm256_load_ps
#define ADD _mm256_add_ps
#endif
#define STEP ((int)sizeof(vec))

static void* reader(void* arg) {
    long generation = 0;
    const char* p = buf + (size_t)arg * part;
    int first = arg == 0;
    for (int round = 0; round < ROUNDS; round++) {
        double t0 = 0;
        barrier(&arrived, nthreads, &generation);
        if (first) t0 = now();
        vec a = ZERO(), b = a, c = a, d = a;  /* four chains: the loads, not the adds, bound it */
        /* Every other round backwards, as the engine's steps go: a round starts with what the last one
         * left in the cache. The same order each round would evict every line just before its turn when
         * the part is about the cache's size, and time a floor 1.3-1.7x too high. */
        for (size_t k = 0; k < part; k += CHUNK) {
            size_t i = round % 2 ? part - CHUNK - k : k;
            for (int j = 0; j < CHUNK; j += 4 * STEP) {
                a = ADD(a, LOAD((const float*)(p + i + j)));
                b = ADD(b, LOAD((const float*)(p + i + j + STEP)));
                c = ADD(c, LOAD((const float*)(p + i + j + 2 * STEP)));
                d = ADD(d, LOAD((const float*)(p + i + j + 3 * STEP)));
            }
        }
        barrier(&arrived, nthreads, &generation);  /* every thread has read its part */
        if (first && now() - t0 < best) best = now() - t0;
        float out[sizeof(vec) / sizeof(float)];
        a = ADD(ADD(a, b), ADD(c, d));
        memcpy(out, &a, sizeof out);  /* the sums are used: no load is left out */
        sink = out[0];
    }
    return NULL;
}

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s BYTES THREADS\n", argv[0]);
        return 2;
    }
    long threads = atol(argv[2]);
    double bytes = atof(argv[1]);
    if (threads < 1 || threads > 256 || bytes < CHUNK) {
        fprintf(stderr, "BYTES >= %d and 1 <= THREADS <= 256\n", CHUNK);
        return 2;
    }
    part = ((size_t)(bytes / threads) + CHUNK - 1) / CHUNK * CHUNK;
    buf = aligned_alloc(64, part * threads);
    if (!buf) return 1;
    memset(buf, 1, part * threads);
    nthreads = threads;
    pthread_t tid[256];
    for (long t = 1; t < threads; t++) pthread_create(&tid[t], NULL, reader, (void*)t);
    reader((void*)0);
    for (long t = 1; t < threads; t++) pthread_join(tid[t], NULL);
    printf("%.2f\n", best * 1e6);
    return 0;
}
