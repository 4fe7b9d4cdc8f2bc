/* CPU-specific float32 kernels; see _cpu.h. Each hot loop is written once as an always-inline body
 * and compiled twice: for baseline x86-64 (SSE2) and, behind a run-time CPU check, for AVX2+FMA.
 */
#define _GNU_SOURCE
#include "_cpu.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#define LE_X86 1
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define INLINE static inline __attribute__((always_inline))

/* -- dispatch ------------------------------------------------------------------------------ */

static int simd_forced = -1;
static int simd_detected = -1;

int le_simd_level(void)
{
    if (simd_forced >= 0)
        return simd_forced;
    if (simd_detected < 0) {
#ifdef LE_X86
        /* GCC's check includes the OS saving the YMM registers (XGETBV), not just CPUID. */
        __builtin_cpu_init();
        simd_detected = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
        simd_detected = 0;
#endif
    }
    return simd_detected;
}

void le_set_simd_level(int level)
{
    simd_forced = -1;
    if (level >= 0)
        simd_forced = level > 0 ? le_simd_level() : 0;
}

/* -- activations --------------------------------------------------------------------------- */

/* tanh(x) ~ x P(x^2) / Q(x^2) on |x| < 9, +-1 beyond (tanh(9) = 1 - 3.0e-8). Coefficients are our own
 * fit (benches/fit_tanh.py: Lawson-weighted least squares, minimax error 1.9e-8 in float64).
 * Max abs error of these kernels against float64 tanh, measured over 3M float32 inputs (every one
 * near 0, and [-20, 20] evenly; tests/test_kernels_math.py checks <= 1e-6): tanh 3.2e-7 portable,
 * 2.7e-7 AVX2+FMA; sigmoid(x) = tanh(x/2)/2 + 1/2: 1.8e-7 both. */
#define TANH_CLAMP 9.0f
#define P0 0.9999998807907104f
#define P1 0.13373185694217682f
#define P2 0.0034865671768784523f
#define P3 2.0471552488743328e-05f
#define P4 1.318379094783495e-08f
#define Q1 0.46706482768058777f
#define Q2 0.02584192529320717f
#define Q3 0.0003271359601058066f
#define Q4 7.702495281591837e-07f

INLINE float tanh_fast(float x)
{
    /* Comparisons written so that a NaN falls through every test and propagates. */
    float xc = x < -TANH_CLAMP ? -TANH_CLAMP : (x > TANH_CLAMP ? TANH_CLAMP : x);
    float s = xc * xc;
    float p = (((P4 * s + P3) * s + P2) * s + P1) * s + P0;
    float q = (((Q4 * s + Q3) * s + Q2) * s + Q1) * s + 1.0f;
    float r = xc * p / q;
    r = r > 1.0f ? 1.0f : (r < -1.0f ? -1.0f : r);
    /* Saturated inputs give exactly +-1, so sigmoid gates are exactly 0 or 1 there. */
    return x >= TANH_CLAMP ? 1.0f : (x <= -TANH_CLAMP ? -1.0f : r);
}

INLINE float sigmoid_fast(float x)
{
    return 0.5f * tanh_fast(0.5f * x) + 0.5f;
}

INLINE void tanh_body(const float *x, float *y, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = tanh_fast(x[i]);
}

INLINE void sigmoid_body(const float *x, float *y, ptrdiff_t n)
{
    for (ptrdiff_t i = 0; i < n; i++)
        y[i] = sigmoid_fast(x[i]);
}

INLINE void lstm_gates_body(int n, int H, const float *restrict pre, const float *restrict bias,
                            float *restrict c, float *restrict h)
{
    for (int j = 0; j < n; j++) {
        float i = sigmoid_fast(pre[j] + bias[j]);
        float f = sigmoid_fast(pre[H + j] + bias[H + j]);
        float g = tanh_fast(pre[2 * H + j] + bias[2 * H + j]);
        float o = sigmoid_fast(pre[3 * H + j] + bias[3 * H + j]);
        float cc = f * c[j] + i * g;
        c[j] = cc;
        h[j] = o * tanh_fast(cc);
    }
}

INLINE void gru_gates_body(int n, int H, const float *restrict xq, const float *restrict hq,
                           const float *restrict bias, const float *restrict bias_hn,
                           const float *h_in, float *h_out)
{
    for (int j = 0; j < n; j++) {
        float r = sigmoid_fast(xq[j] + hq[j] + bias[j]);
        float z = sigmoid_fast(xq[H + j] + hq[H + j] + bias[H + j]);
        float nn = tanh_fast(xq[2 * H + j] + bias[2 * H + j] + r * (hq[2 * H + j] + bias_hn[j]));
        h_out[j] = (1.0f - z) * nn + z * h_in[j];
    }
}

/* -- GEMV over row-major weights ----------------------------------------------------------- */

/* Portable: eight partial sums per row, which the compiler keeps in vector registers. */
INLINE float dot_c(const float *w, const float *v, int K)
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

static void gemv2_c(int rows, const float *add, const float *W1, ptrdiff_t ld1, const float *v1, int K1,
                    const float *W2, ptrdiff_t ld2, const float *v2, int K2, float *y)
{
    for (int r = 0; r < rows; r++) {
        float s = dot_c(W1 + r * ld1, v1, K1);
        if (W2)
            s += dot_c(W2 + r * ld2, v2, K2);
        y[r] = add ? add[r] + s : s;
    }
}

#ifdef LE_X86
/* Eight rows at a time: one load of v feeds eight FMAs, and the eight sums come out of one
 * horizontal-add tree as a single vector. Row-major weights are read as they are: no packed copy. */
AVX2 static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3,
                                __m256 a4, __m256 a5, __m256 a6, __m256 a7)
{
    __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
    __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

AVX2 static inline float hsum1(__m256 a)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline void dot8(const float *W, ptrdiff_t ld, const float *v, int K, __m256 *acc)
{
    const float *w0 = W, *w1 = W + ld, *w2 = W + 2 * ld, *w3 = W + 3 * ld;
    const float *w4 = W + 4 * ld, *w5 = W + 5 * ld, *w6 = W + 6 * ld, *w7 = W + 7 * ld;
    __m256 a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
    __m256 a4 = acc[4], a5 = acc[5], a6 = acc[6], a7 = acc[7];
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 vv = _mm256_loadu_ps(v + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), vv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), vv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), vv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), vv, a3);
        a4 = _mm256_fmadd_ps(_mm256_loadu_ps(w4 + k), vv, a4);
        a5 = _mm256_fmadd_ps(_mm256_loadu_ps(w5 + k), vv, a5);
        a6 = _mm256_fmadd_ps(_mm256_loadu_ps(w6 + k), vv, a6);
        a7 = _mm256_fmadd_ps(_mm256_loadu_ps(w7 + k), vv, a7);
    }
    if (k < K) {
        /* The last K % 8 columns through a mask: no scalar tail and no read past a row. */
        static const int ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
        __m256i m = _mm256_loadu_si256((const __m256i *)(ones + 8 - (K - k)));
        __m256 vv = _mm256_maskload_ps(v + k, m);
        a0 = _mm256_fmadd_ps(_mm256_maskload_ps(w0 + k, m), vv, a0);
        a1 = _mm256_fmadd_ps(_mm256_maskload_ps(w1 + k, m), vv, a1);
        a2 = _mm256_fmadd_ps(_mm256_maskload_ps(w2 + k, m), vv, a2);
        a3 = _mm256_fmadd_ps(_mm256_maskload_ps(w3 + k, m), vv, a3);
        a4 = _mm256_fmadd_ps(_mm256_maskload_ps(w4 + k, m), vv, a4);
        a5 = _mm256_fmadd_ps(_mm256_maskload_ps(w5 + k, m), vv, a5);
        a6 = _mm256_fmadd_ps(_mm256_maskload_ps(w6 + k, m), vv, a6);
        a7 = _mm256_fmadd_ps(_mm256_maskload_ps(w7 + k, m), vv, a7);
    }
    acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
    acc[4] = a4; acc[5] = a5; acc[6] = a6; acc[7] = a7;
}

AVX2 static inline __m256 dot1(const float *w, const float *v, int K, __m256 a)
{
    int k = 0;
    for (; k + 8 <= K; k += 8)
        a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(v + k), a);
    if (k < K) {
        static const int ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
        __m256i m = _mm256_loadu_si256((const __m256i *)(ones + 8 - (K - k)));
        a = _mm256_fmadd_ps(_mm256_maskload_ps(w + k, m), _mm256_maskload_ps(v + k, m), a);
    }
    return a;
}

AVX2 static void gemv2_avx2(int rows, const float *add, const float *W1, ptrdiff_t ld1, const float *v1,
                            int K1, const float *W2, ptrdiff_t ld2, const float *v2, int K2, float *y)
{
    int r = 0;
    for (; r + 8 <= rows; r += 8) {
        __m256 acc[8];
        for (int l = 0; l < 8; l++)
            acc[l] = _mm256_setzero_ps();
        dot8(W1 + r * ld1, ld1, v1, K1, acc);
        if (W2)
            dot8(W2 + r * ld2, ld2, v2, K2, acc);
        __m256 s = hsum8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
        if (add)
            s = _mm256_add_ps(s, _mm256_loadu_ps(add + r));
        _mm256_storeu_ps(y + r, s);
    }
    for (; r < rows; r++) {
        __m256 a = dot1(W1 + r * ld1, v1, K1, _mm256_setzero_ps());
        if (W2)
            a = dot1(W2 + r * ld2, v2, K2, a);
        float s = hsum1(a);
        y[r] = add ? add[r] + s : s;
    }
}
#endif

/* -- GEMM over row-major operands: C[i, j] (+)= A[i, :] . W[j, :] -------------------------- */

/* Rows of A per pass over W: MC rows of K floats stay in L2 while every row of W goes by. */
static int gemm_mc(int K)
{
    int mc = (160 * 1024 / 4) / (K > 0 ? K : 1) / 3 * 3;
    return mc < 3 ? 3 : mc;
}

static void gemm_nt_c(int M, int N, int K, const float *A, ptrdiff_t lda, const float *W, ptrdiff_t ldw,
                      float *C, ptrdiff_t ldc, int accumulate)
{
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            float s = dot_c(W + j * ldw, A + i * lda, K);
            C[i * ldc + j] = accumulate ? C[i * ldc + j] + s : s;
        }
}

#ifdef LE_X86
/* Four rows of W against S (1..3) rows of A: 4 + S loads feed 4*S FMAs, all accumulators in
 * registers; the 4*S sums come out of hadd trees at the end. The dot-product form reads the
 * weights as they are laid out: no packed copy to keep, none to build per step. */
AVX2 static inline __attribute__((always_inline)) void kern4(const int S, int K, const float *A, ptrdiff_t lda,
                                                             const float *W, ptrdiff_t ldw, float *C,
                                                             ptrdiff_t ldc, int accumulate)
{
    __m256 acc[3][4];
    for (int s = 0; s < S; s++)
        for (int r = 0; r < 4; r++)
            acc[s][r] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 a[3];
        for (int s = 0; s < S; s++)
            a[s] = _mm256_loadu_ps(A + s * lda + k);
        for (int r = 0; r < 4; r++) {
            __m256 w = _mm256_loadu_ps(W + r * ldw + k);
            for (int s = 0; s < S; s++)
                acc[s][r] = _mm256_fmadd_ps(w, a[s], acc[s][r]);
        }
    }
    if (k < K) {
        static const int ones[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
        __m256i m = _mm256_loadu_si256((const __m256i *)(ones + 8 - (K - k)));
        __m256 a[3];
        for (int s = 0; s < S; s++)
            a[s] = _mm256_maskload_ps(A + s * lda + k, m);
        for (int r = 0; r < 4; r++) {
            __m256 w = _mm256_maskload_ps(W + r * ldw + k, m);
            for (int s = 0; s < S; s++)
                acc[s][r] = _mm256_fmadd_ps(w, a[s], acc[s][r]);
        }
    }
    for (int s = 0; s < S; s++) {
        __m256 t0 = _mm256_hadd_ps(acc[s][0], acc[s][1]);
        __m256 t1 = _mm256_hadd_ps(acc[s][2], acc[s][3]);
        __m256 u = _mm256_hadd_ps(t0, t1);
        __m128 sum = _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
        float *c = C + s * ldc;
        if (accumulate)
            sum = _mm_add_ps(sum, _mm_loadu_ps(c));
        _mm_storeu_ps(c, sum);
    }
}

AVX2 static void gemm_nt_avx2(int M, int N, int K, const float *A, ptrdiff_t lda, const float *W, ptrdiff_t ldw,
                              float *C, ptrdiff_t ldc, int accumulate)
{
    int mc = gemm_mc(K);
    for (int i0 = 0; i0 < M; i0 += mc) {
        int i1 = i0 + mc < M ? i0 + mc : M;
        int j = 0;
        for (; j + 4 <= N; j += 4) {
            const float *w = W + j * ldw;
            int i = i0;
            for (; i + 3 <= i1; i += 3)
                kern4(3, K, A + i * lda, lda, w, ldw, C + i * ldc + j, ldc, accumulate);
            if (i1 - i == 2)
                kern4(2, K, A + i * lda, lda, w, ldw, C + i * ldc + j, ldc, accumulate);
            else if (i1 - i == 1)
                kern4(1, K, A + i * lda, lda, w, ldw, C + i * ldc + j, ldc, accumulate);
        }
        for (; j < N; j++)
            for (int i = i0; i < i1; i++) {
                float s = hsum1(dot1(W + j * ldw, A + i * lda, K, _mm256_setzero_ps()));
                C[i * ldc + j] = accumulate ? C[i * ldc + j] + s : s;
            }
    }
}
#endif

/* -- the variants and their dispatch ------------------------------------------------------- */

static void tanh_c(const float *x, float *y, ptrdiff_t n) { tanh_body(x, y, n); }
static void sigmoid_c(const float *x, float *y, ptrdiff_t n) { sigmoid_body(x, y, n); }
static void lstm_gates_c(int n, int H, const float *pre, const float *bias, float *c, float *h)
{
    lstm_gates_body(n, H, pre, bias, c, h);
}
static void gru_gates_c(int n, int H, const float *xq, const float *hq, const float *bias,
                        const float *bias_hn, const float *h_in, float *h_out)
{
    gru_gates_body(n, H, xq, hq, bias, bias_hn, h_in, h_out);
}

#ifdef LE_X86
AVX2 static void tanh_avx2(const float *x, float *y, ptrdiff_t n) { tanh_body(x, y, n); }
AVX2 static void sigmoid_avx2(const float *x, float *y, ptrdiff_t n) { sigmoid_body(x, y, n); }
AVX2 static void lstm_gates_avx2(int n, int H, const float *pre, const float *bias, float *c, float *h)
{
    lstm_gates_body(n, H, pre, bias, c, h);
}
AVX2 static void gru_gates_avx2(int n, int H, const float *xq, const float *hq, const float *bias,
                                const float *bias_hn, const float *h_in, float *h_out)
{
    gru_gates_body(n, H, xq, hq, bias, bias_hn, h_in, h_out);
}
#define PICK(name) (le_simd_level() ? name##_avx2 : name##_c)
#else
#define PICK(name) (name##_c)
#endif

void le_tanh_f32(const float *x, float *y, ptrdiff_t n) { PICK(tanh)(x, y, n); }
void le_sigmoid_f32(const float *x, float *y, ptrdiff_t n) { PICK(sigmoid)(x, y, n); }

/* -- worker pool --------------------------------------------------------------------------- */

#define MAX_THREADS 64
/* An idle worker spins for the next job, first tightly, then yielding its core at each turn (a
 * BLAS call in between, a Dense head of milliseconds, gets the core when it wants it), then sleeps.
 * Back-to-back streaming calls and the next layer of a step find it spinning. A job is given only
 * to workers spinning tightly, known to be on a core: one that yields or sleeps may take
 * milliseconds to come back on a busy machine, so that call runs on one thread and the worker,
 * poked, spins tightly for the next. */
#define IDLE_PAUSE_NS 20000L
#define PATIENT_FLOPS 2e7
#define IDLE_YIELD_NS 500000L
/* A wait at a step's barrier longer than this, and than twice the waiting thread's own work for
 * the step, means a thread of the job lost its core to another process. Short steps (streaming)
 * then finish the call on one thread and run alone for a while, backing off from 1 ms to 1 s,
 * instead of stalling every step for a scheduler tick; long steps (big batches) just wait, a
 * lost tick being small next to them. Spinning yields the core past STALL_NS. */
#define STALL_NS 50000L
#define SOLO_NS_MIN 1000000L
#define SOLO_NS_MAX 1000000000L

typedef void (*job_fn)(void *arg, int tid, int nth);

static struct {
    pthread_mutex_t busy;  /* held by the one caller that has the workers; others run alone */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int started;           /* workers running: tids 1..started */
    atomic_uint generation;
    atomic_int done;
    job_fn fn;
    void *arg;
    int nth;
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

typedef struct {
    atomic_int count;
    atomic_int sense;
    atomic_int solo;  /* set at a barrier after a stall: thread 0 finishes the job alone */
    int n;
} barrier_t;

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static unsigned start_generation[MAX_THREADS];

static atomic_int stalled;          /* a wait of the current job counted as a stall */
static _Atomic long solo_until;     /* calls start on one thread until then (now_ns) */
static _Atomic long solo_backoff = SOLO_NS_MIN;

/* Wait until cond(arg) holds: spin, then yield the core once the wait passes STALL_NS; a wait
 * past stall_ns (0: never) marks the job as stalled. */
static void wait_for(int (*cond)(void *), void *arg, long stall_ns)
{
    long start = 0;
    int spins = 0, noted = 0;
    while (!cond(arg)) {
        cpu_relax();
        if ((++spins & 63) == 0) {
            long t = now_ns();
            if (!start)
                start = t;
            if (t - start > STALL_NS) {
                if (stall_ns && !noted && t - start > stall_ns) {
                    atomic_store_explicit(&stalled, 1, memory_order_relaxed);
                    noted = 1;
                }
                sched_yield();
            }
        }
    }
}

typedef struct {
    barrier_t *b;
    int s;
} sense_wait;

static int sense_flipped(void *p)
{
    sense_wait *w = p;
    return atomic_load_explicit(&w->b->sense, memory_order_acquire) == w->s;
}

/* work_ns: how long this thread worked since the last barrier. */
static void barrier_wait(barrier_t *b, int *local_sense, long work_ns)
{
    int s = !*local_sense;
    *local_sense = s;
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == b->n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        if (atomic_load_explicit(&stalled, memory_order_relaxed))
            atomic_store_explicit(&b->solo, 1, memory_order_relaxed);
        atomic_store_explicit(&b->sense, s, memory_order_release);
        return;
    }
    sense_wait w = {b, s};
    wait_for(sense_flipped, &w, work_ns > STALL_NS / 2 ? 2 * work_ns : STALL_NS);
}

static atomic_int polling[MAX_THREADS]; /* worker tid spins tightly: it is on a core, now */
static atomic_uint pokes;               /* bumped to wake the workers without a job */

static void *worker_main(void *p)
{
    int tid = (int)(ptrdiff_t)p;
    /* The generation when this worker was made: the job that made it comes after. */
    unsigned seen = start_generation[tid];
    for (;;) {
        long start = now_ns();
        unsigned poked = atomic_load_explicit(&pokes, memory_order_relaxed);
        int spins = 0;
        atomic_store_explicit(&polling[tid], 1, memory_order_relaxed);
        while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
            if ((++spins & 63) != 0) {
                cpu_relax();
                continue;
            }
            if (atomic_load_explicit(&pokes, memory_order_relaxed) != poked) {
                /* A caller found us away and ran alone: spin tightly again for the next job. */
                poked = atomic_load_explicit(&pokes, memory_order_relaxed);
                start = now_ns();
                atomic_store_explicit(&polling[tid], 1, memory_order_relaxed);
            }
            long idle = now_ns() - start;
            if (idle < IDLE_PAUSE_NS) {
                cpu_relax();
            } else if (idle < IDLE_YIELD_NS) {
                atomic_store_explicit(&polling[tid], 0, memory_order_relaxed);
                sched_yield();
            } else {
                pthread_mutex_lock(&pool.lock);
                while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen
                       && atomic_load_explicit(&pokes, memory_order_relaxed) == poked)
                    pthread_cond_wait(&pool.wake, &pool.lock);
                pthread_mutex_unlock(&pool.lock);
                poked = atomic_load_explicit(&pokes, memory_order_relaxed);
                start = now_ns();
                atomic_store_explicit(&polling[tid], 1, memory_order_relaxed);
            }
        }
        atomic_store_explicit(&polling[tid], 0, memory_order_relaxed);
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (tid < pool.nth) {
            pool.fn(pool.arg, tid, pool.nth);
            atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        }
    }
    return NULL;
}

static void pool_after_fork(void)
{
    /* A forked child has none of the parent's threads: start over. */
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.started = 0;
    for (int tid = 0; tid < MAX_THREADS; tid++)
        atomic_store(&polling[tid], 0);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

int le_cpu_count(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0)
        return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

/* The number of threads a job may use, up to nth: 1 when the workers are busy with another
 * caller's job (so two sessions stepping at once each keep one core), or, unless the job is
 * patient (long), when a worker is not spinning on a core. Above 1 the workers are reserved for
 * this caller until pool_run. */
static int pool_acquire(int nth, int patient)
{
    if (nth > MAX_THREADS)
        nth = MAX_THREADS;
    if (nth <= 1)
        return 1;
    if (now_ns() < atomic_load_explicit(&solo_until, memory_order_relaxed))
        return 1;
    if (pthread_mutex_trylock(&pool.busy) != 0)
        return 1;
    pthread_once(&fork_once, register_fork);
    while (pool.started < nth - 1) {
        pthread_t t;
        pthread_attr_t attr;
        int tid = pool.started + 1;
        start_generation[tid] = atomic_load(&pool.generation);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker_main, (void *)(ptrdiff_t)tid);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        pool.started = tid;
    }
    if (nth > pool.started + 1)
        nth = pool.started + 1;
    int away = 0;
    for (int tid = 1; tid < nth; tid++)
        away |= !atomic_load_explicit(&polling[tid], memory_order_relaxed);
    if (away && !patient) {
        pthread_mutex_lock(&pool.lock);
        atomic_fetch_add_explicit(&pokes, 1, memory_order_relaxed);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
        nth = 1;
    }
    if (nth <= 1)
        pthread_mutex_unlock(&pool.busy);
    return nth;
}

static int workers_done(void *nth)
{
    return atomic_load_explicit(&pool.done, memory_order_acquire) == *(int *)nth - 1;
}

/* Run fn on nth threads as pool_acquire granted them; the caller is tid 0. */
static void pool_run(job_fn fn, void *arg, int nth)
{
    if (nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    pool.nth = nth;
    atomic_store_explicit(&stalled, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    fn(arg, 0, nth);
    wait_for(workers_done, &nth, 0);
    if (atomic_load_explicit(&stalled, memory_order_relaxed)) {
        long backoff = atomic_load_explicit(&solo_backoff, memory_order_relaxed);
        atomic_store_explicit(&solo_until, now_ns() + backoff, memory_order_relaxed);
        atomic_store_explicit(&solo_backoff, backoff < SOLO_NS_MAX ? 2 * backoff : backoff, memory_order_relaxed);
    } else {
        atomic_store_explicit(&solo_backoff, SOLO_NS_MIN, memory_order_relaxed);
    }
    pthread_mutex_unlock(&pool.busy);
}

/* -- a layer's steps ---------------------------------------------------------------------- */

typedef void (*gemv2_fn)(int, const float *, const float *, ptrdiff_t, const float *, int,
                         const float *, ptrdiff_t, const float *, int, float *);
typedef void (*gemm_fn)(int, int, int, const float *, ptrdiff_t, const float *, ptrdiff_t, float *, ptrdiff_t, int);

typedef struct {
    le_steps_args *a;
    barrier_t barrier;
} steps_job;

/* Thread tid's units: slices of 16 (whole 64-byte lines, no line written by two cores; 8-row GEMV
 * blocks fall on the same rows whatever the split, so results never depend on it). */
INLINE void slice_of(int H, int tid, int nth, int *a0, int *a1)
{
    int chunk = ((H + nth - 1) / nth + 15) / 16 * 16;
    *a0 = tid * chunk < H ? tid * chunk : H;
    *a1 = *a0 + chunk < H ? *a0 + chunk : H;
}

INLINE void steps_body(steps_job *job, int tid, int nth, gemv2_fn gemv, gemm_fn gemm, int avx2)
{
    le_steps_args *a = job->a;
    int B = a->B, H = a->H, In = a->In, T = a->T, G = a->cell == 0 ? 4 : 3;
    ptrdiff_t GH = (ptrdiff_t)G * H, xp_row = (ptrdiff_t)T * GH;
    int a0, a1;
    slice_of(H, tid, nth, &a0, &a1);
    int n = a1 - a0;
    float *xp = a->work;                  /* (B, T, GH) input projections, then pre-activations */
    float *hq = xp + (ptrdiff_t)B * xp_row; /* (B, GH) GRU recurrent products */
    float *hbuf[2] = {hq + (ptrdiff_t)B * GH, hq + (ptrdiff_t)B * GH + (ptrdiff_t)B * H};
    /* One row, one step: both products in one pass over [W_ih | W_hh], nothing projected ahead. */
    int fused = B == 1 && T == 1;
    int sense = 0;
    long started = nth > 1 ? now_ns() : 0;
    /* Each thread projects its own columns of xp: no barrier needed before step 0. */
    if (!fused && n > 0)
        for (int g = 0; g < G; g++) {
            ptrdiff_t r0 = (ptrdiff_t)g * H + a0;
            gemm(B * T, n, In, a->x, In, a->w_ih + r0 * In, In, xp + r0, GH, 0);
        }
    for (int s = 0; s < T; s++) {
        if (nth > 1 && atomic_load_explicit(&job->barrier.solo, memory_order_relaxed)) {
            /* A thread lost its core mid-call: stop meeting at barriers, thread 0 takes every unit
             * (every projection is done: each thread finished step 0 before the first barrier). */
            if (tid != 0)
                return;
            nth = 1;
            a0 = 0;
            a1 = n = H;
        }
        int t = a->reverse ? T - 1 - s : s;
        const float *hc = hbuf[s & 1];
        float *hn = hbuf[(s + 1) & 1];
        if (n > 0) {
            float *pre = xp + (ptrdiff_t)t * GH;  /* row b at pre + b * xp_row */
            for (int g = 0; g < G; g++) {
                ptrdiff_t r0 = (ptrdiff_t)g * H + a0;
                const float *wh = a->w_hh + r0 * H;
                if (a->cell == 0) {
                    if (fused)
                        gemv(n, NULL, a->w_ih + r0 * In, In, a->x, In, wh, H, hc, H, pre + r0);
                    else if (B == 1)
                        gemv(n, pre + r0, wh, H, hc, H, NULL, 0, NULL, 0, pre + r0);
                    else
                        gemm(B, n, H, hc, H, wh, H, pre + r0, xp_row, 1);
                } else {
                    if (B == 1)
                        gemv(n, NULL, wh, H, hc, H, NULL, 0, NULL, 0, hq + r0);
                    else
                        gemm(B, n, H, hc, H, wh, H, hq + r0, GH, 0);
                    if (fused)
                        gemv(n, NULL, a->w_ih + r0 * In, In, a->x, In, NULL, 0, NULL, 0, pre + r0);
                }
            }
            for (int b = 0; b < B; b++) {
                float *y = a->y + b * a->y_row + (ptrdiff_t)t * a->y_step + a0;
                const float *hcb = hc + (ptrdiff_t)b * H + a0;
                float *hnb = hn + (ptrdiff_t)b * H + a0;
                if (a->mask && !a->mask[(ptrdiff_t)b * T + t]) {
                    /* Masked: the state carries over; the output is 0 or the previous one (Keras). */
                    memcpy(hnb, hcb, n * sizeof(float));
                    if (a->zero_masked || s == 0)
                        memset(y, 0, n * sizeof(float));
                    else
                        memcpy(y, y + (a->reverse ? 1 : -1) * a->y_step, n * sizeof(float));
                    continue;
                }
                const float *q = pre + b * xp_row + a0;
                if (a->cell == 0) {
                    float *cb = a->c + (ptrdiff_t)b * H + a0;
#ifdef LE_X86
                    if (avx2)
                        lstm_gates_avx2(n, H, q, a->bias + a0, cb, hnb);
                    else
#endif
                        lstm_gates_c(n, H, q, a->bias + a0, cb, hnb);
                } else {
                    const float *hqb = hq + (ptrdiff_t)b * GH + a0;
#ifdef LE_X86
                    if (avx2)
                        gru_gates_avx2(n, H, q, hqb, a->bias + a0, a->bias_hn + a0, hcb, hnb);
                    else
#endif
                        gru_gates_c(n, H, q, hqb, a->bias + a0, a->bias_hn + a0, hcb, hnb);
                }
                memcpy(y, hnb, n * sizeof(float));
            }
        }
        if (nth > 1) {
            long arrived = now_ns();
            barrier_wait(&job->barrier, &sense, arrived - started);
            started = now_ns();
        }
    }
}

static void steps_c(void *job, int tid, int nth) { steps_body(job, tid, nth, gemv2_c, gemm_nt_c, 0); }
#ifdef LE_X86
AVX2 static void steps_avx2(void *job, int tid, int nth)
{
    steps_body(job, tid, nth, gemv2_avx2, gemm_nt_avx2, 1);
}
#endif

int le_run_steps_f32(le_steps_args *a, int nthreads)
{
    steps_job job;
    job.a = a;
    atomic_init(&job.barrier.count, 0);
    atomic_init(&job.barrier.sense, 0);
    atomic_init(&job.barrier.solo, 0);
    ptrdiff_t GH = (ptrdiff_t)(a->cell == 0 ? 4 : 3) * a->H, BH = (ptrdiff_t)a->B * a->H;
    float *h0 = a->work + (ptrdiff_t)a->B * a->T * GH + (ptrdiff_t)a->B * GH;
    memcpy(h0, a->h, BH * sizeof(float));
    /* Each thread needs at least one slice of units. */
    int most = (a->H + 15) / 16;
    if (nthreads > most)
        nthreads = most;
#ifdef LE_X86
    job_fn fn = le_simd_level() ? steps_avx2 : steps_c;
#else
    job_fn fn = steps_c;
#endif
    /* A long job (over ~1 ms of work) waits for workers that are away: waking them costs it little. */
    double flops = 2.0 * a->B * a->T * GH * (a->In + a->H);
    int used = pool_acquire(nthreads, flops > PATIENT_FLOPS);
    job.barrier.n = used;
    pool_run(fn, &job, used);
    memcpy(a->h, h0 + (a->T & 1) * BH, BH * sizeof(float));
    return used;
}

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
