/* What the C files behind _cpu.h share: the variant table, a block of work for the products, and
 * the worker pool's interface. Not seen by Cython. */
#ifndef LSTM_ENGINE_CPU_IMPL_H
#define LSTM_ENGINE_CPU_IMPL_H

#include "_cpu.h"

#include <stdatomic.h>

#if defined(__x86_64__) || defined(__i386__)
#define LE_X86 1
#endif

#define INLINE static inline __attribute__((always_inline))

/* -- a block of the products ---------------------------------------------------------------- */

enum { MODE_PROJECT = 0, MODE_LSTM = 1, MODE_GRU = 2 };

/* Rows of A times panels of packed W, and what to do with each MR x (G*16) tile of sums:
 * MODE_PROJECT stores tile + add into out (the input projection of every step, bias included);
 * MODE_LSTM / MODE_GRU apply the gates to the tile while it is in registers/L1 and write the
 * new state and the output. Row r of the block is batch row r. */
typedef struct {
    int mode, G, H;
    const float *A;            /* row r at A + r * lda: x rows (project), h (steps) */
    ptrdiff_t lda;
    int K;
    const float *W;            /* packed, panel p at W + p * K * G * 16 */
    /* A second product summed into the same tile before the epilogue: W_ih . x_t and W_hh . h in
     * one pass, nothing projected ahead (LSTM: rows at A2 + r * lda2; GRU: one row, kept apart, as
     * r multiplies only the recurrent part of n). */
    const float *A2, *W2;
    ptrdiff_t lda2;
    int K2;
    const float *add;          /* per row: + r * ld_add (0: the same vector for each row), + p * G * 16 */
    ptrdiff_t ld_add;
    float *out;                /* MODE_PROJECT: row r at out + r * ldo, panel p at + p * G * 16 */
    ptrdiff_t ldo;
    int steps, rows;           /* > 0: A's row b * steps + t goes to out's row t * rows + b (time-major) */
    const float *bias;         /* GRU with A2: the packed bias added to W2's product */
    const float *bias_hn;      /* GRU: padded b_hn */
    float *c;                  /* LSTM cell, row r at c + r * H */
    const float *h_in;         /* previous h, row r at h_in + r * H (masked rows keep it) */
    float *h_out;
    float *y;                  /* output row r at y + r * y_row, or at y + y_rows[r] * y_row */
    const int *y_rows;
    ptrdiff_t y_row;
    ptrdiff_t y_back;          /* offset from a step's output to the previous one in running order */
    const unsigned char *mask; /* row r's flag at mask[r * mask_row], or NULL */
    ptrdiff_t mask_row;
    int zero_masked, first;
} le_block;

typedef struct {
    void (*tanh)(const float *x, float *y, ptrdiff_t n);
    void (*sigmoid)(const float *x, float *y, ptrdiff_t n);
    /* rows [r0, r1) by panels [p0, p1) */
    void (*block)(const le_block *j, int r0, int r1, int p0, int p1);
    void (*gemv)(int N, int K, const float *W, ptrdiff_t ldw, const float *x, const float *b, float *y);
} le_variant;

extern const le_variant le_variant_portable;
#ifdef LE_X86
extern const le_variant le_variant_avx2;
extern const le_variant le_variant_avx512;
#endif
/* The table of the variant in use (cpu_detect.c). */
const le_variant *le_variant_in_use(void);

/* -- pieces of the per-variant loops that cpu_products.c and cpu_conv.c share ---------------- */

/* Portable dot product: eight partial sums, which the compiler keeps in vector registers. */
INLINE float le_dot_c(const float *w, const float *v, int K)
{
    float acc[8] = {0};
    int k = 0;
    for (; k + 8 <= K; k += 8)
        for (int l = 0; l < 8; l++)
            acc[l] += w[k + l] * v[k + l];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; k < K; k++)
        s += w[k] * v[k];
    return s;
}

#ifdef LE_X86
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))

/* The sum of a's eight lanes. */
AVX2 static inline float le_hsum_avx2(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The _mm256_maskload_ps mask of the last K % 8 elements of a row (none read past its end). */
AVX2 static inline __m256i le_tail_mask_avx2(int K)
{
    static const int ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
    return _mm256_loadu_si256((const __m256i *)(ones + 8 - (K & 7)));
}
#endif

/* -- the worker pool (cpu_pool.c) ---------------------------------------------------------- */

typedef void (*job_fn)(void *arg, int tid, int nth);

long le_now_ns(void);
/* The number of threads a job may use, up to nth; above 1 the workers are this caller's until
 * le_pool_run. flops: the job's work; step_flops: the work between two points where every thread
 * waits for the others (a step), which a thread that lost its core holds up (cpu_pool.c). */
int le_pool_acquire(int nth, double flops, double step_flops);
/* Run fn(arg, 0, nth) on the caller at once; up to nth - 1 workers join as tids 1.. when they get
 * a core, or never: fn must finish the whole job on whichever tids come (cpu_steps.c claims units). */
void le_pool_run(job_fn fn, void *arg, int nth);
/* Spin until cond(arg), yielding the core once the wait is long; returns the ns waited (about). */
long le_wait_until(int (*cond)(void *), void *arg);
/* A thread of the running job waited long for another: the next calls run on one thread a while. */
void le_pool_note_stall(void);
/* Workers that have joined the running job so far: tids 1..le_pool_joined(); a higher tid has not come. */
int le_pool_joined(void);
/* Units 0..U-1 of one product on up to nthreads threads (cpu_steps.c): each thread owns a range, the
 * same units at every call, and takes the others' leftovers. Returns the threads used. */
int le_run_units(int U, void (*unit)(void *ctx, int u), void *ctx, int nthreads, double flops);

#endif
