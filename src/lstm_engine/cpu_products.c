/* The float32 arithmetic, once per variant: activations, the packed-panel micro-kernels with the
 * gates applied to each tile of sums while it is in registers, and a row-major GEMV. Each hot loop
 * is an always-inline body compiled for baseline x86-64 (SSE2), for AVX2+FMA and for AVX-512 by
 * target attributes; cpu_detect.c picks the table at run time.
 */
#define _GNU_SOURCE
#include "_cpu_impl.h"

#include <string.h>

#ifdef LE_X86
#include <immintrin.h>
/* prefer-vector-width=512: GCC's generic tuning would auto-vectorise the gate loops at 256 bits. */
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")))
#endif

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

/* n units of one panel; gate g of unit j at [g * LE_PANEL + j] in pre and add. */
INLINE void lstm_gates_body(int n, const float *restrict pre, const float *restrict add, float *restrict c,
                            float *restrict h)
{
    for (int j = 0; j < n; j++) {
        float i = sigmoid_fast(pre[j] + add[j]);
        float f = sigmoid_fast(pre[LE_PANEL + j] + add[LE_PANEL + j]);
        float g = tanh_fast(pre[2 * LE_PANEL + j] + add[2 * LE_PANEL + j]);
        float o = sigmoid_fast(pre[3 * LE_PANEL + j] + add[3 * LE_PANEL + j]);
        float cc = f * c[j] + i * g;
        c[j] = cc;
        h[j] = o * tanh_fast(cc);
    }
}

/* xq: the input part with the biases (b_in only for n), hq: the recurrent products. */
INLINE void gru_gates_body(int n, const float *restrict xq, const float *restrict hq, const float *restrict bias_hn,
                           const float *h_in, float *h_out)
{
    for (int j = 0; j < n; j++) {
        float r = sigmoid_fast(xq[j] + hq[j]);
        float z = sigmoid_fast(xq[LE_PANEL + j] + hq[LE_PANEL + j]);
        float nn = tanh_fast(xq[2 * LE_PANEL + j] + r * (hq[2 * LE_PANEL + j] + bias_hn[j]));
        h_out[j] = (1.0f - z) * nn + z * h_in[j];
    }
}

/* -- what a tile of sums becomes ------------------------------------------------------------ */

typedef void (*lstm_gates_fn)(int n, const float *restrict pre, const float *restrict add, float *restrict c,
                              float *restrict h);

/* Row r's tile (G * 16 sums of panel p) is stored, or turned into the new state and output by the
 * variant's LSTM gate loop (a constant where BLOCK_BODY inlines this, so the call is inlined too). */
INLINE void epilogue(const le_block *j, int r, const float *tile, int p, const float *add, lstm_gates_fn lstm_gates)
{
    int G16 = j->G * LE_PANEL, u0 = p * LE_PANEL;
    if (j->mode == MODE_PROJECT) {
        ptrdiff_t row = j->steps > 0 ? (ptrdiff_t)(r % j->steps) * j->rows + r / j->steps : r;
        float *o = j->out + row * j->ldo + (ptrdiff_t)p * G16;
        for (int i = 0; i < G16; i++)
            o[i] = tile[i] + add[i];
        return;
    }
    int n = j->H - u0 < LE_PANEL ? j->H - u0 : LE_PANEL;
    const float *hin = j->h_in + (ptrdiff_t)r * j->H + u0;
    float *hout = j->h_out + (ptrdiff_t)r * j->H + u0;
    float *y = j->y + (j->y_rows ? j->y_rows[r] : r) * j->y_row + u0;
    if (j->mask && !j->mask[r * j->mask_row]) {
        /* Masked: the state carries over; the output is 0 or the previous one (Keras). */
        memcpy(hout, hin, n * sizeof(float));
        if (j->zero_masked || j->first)
            memset(y, 0, n * sizeof(float));
        else
            memcpy(y, y + j->y_back, n * sizeof(float));
        return;
    }
    if (j->mode == MODE_LSTM)
        lstm_gates(n, tile, add, j->c + (ptrdiff_t)r * j->H + u0, hout);
    else
        gru_gates_body(n, add, tile, j->bias_hn + u0, hin, hout);
    memcpy(y, hout, n * sizeof(float));
}

#define TILE 64 /* floats per tile row: up to 4 gates x 16 units */
/* Row chunks and panel depth. A chunk's tiles (MC rows) stay in L1/L2 while a KC-deep slice of a
 * panel (KC * G * 16 floats: 32 KB for LSTM) stays in L1 for every MR rows of the chunk: without
 * the K split each MR rows read the whole panel (128 KB at K = 512) from L2 again, and the weight
 * loads were the hot spots of the loop (perf). 128 rows: the batch-large workload's 128 in one
 * chunk, each slice of the weights read once a step (96 read them twice: 129-131 against 135
 * GFLOP/s, one thread, busy machine). */
#define MC 128
#define KC 128

/* Part `part` of `parts` of the KC slice of weights at next, asked of the caches (L2) while the MR
 * rows of the current slice run: the weights of a step (8 MB for the batch workload, 32 MB for
 * batch-large) do not stay in a core's 2 MiB L2, and the first rows of each slice waited for it
 * from L3. A prefetch never faults, so past the last panel it is only wasted. */
INLINE void prefetch_part(const float *next, int floats, int part, int parts)
{
    if (!parts)
        return;
    for (int i = (int)((long)floats * part / parts) & ~15; i < (long)floats * (part + 1) / parts; i += 16)
        __builtin_prefetch(next + i, 0, 2);
}

/* What the epilogue of panel p reads for rows [r0, r1), asked of the caches before the panel's
 * product runs (a few rows only: the steps bound by reading the weights). Such a step streams its
 * weights through L2 (2 MB a core for LSTM 512 on 2 cores of 1 MiB), so this step's row of
 * projections, the cell and the state, used once a step, had left it, and each panel's gates waited
 * for them from L3 after the product: the first load of the projections was the epilogue's hottest
 * instruction (perf, Zen 4), the epilogue 7.3 % of LSTM 512's steps on one core, 5.2 % with this. */
#define EPILOGUE_PREFETCH_ROWS 8

INLINE void prefetch_epilogue(const le_block *j, int r0, int r1, int p)
{
    if (j->mode == MODE_PROJECT || r1 - r0 > EPILOGUE_PREFETCH_ROWS)
        return;
    int G16 = j->G * LE_PANEL, u0 = p * LE_PANEL;
    for (int r = r0; r < r1; r++) {
        const float *add = j->add + (ptrdiff_t)p * G16 + r * j->ld_add;
        for (int i = 0; i < G16; i += 16)
            __builtin_prefetch(add + i, 0, 3);
        if (j->mode == MODE_LSTM)
            __builtin_prefetch(j->c + (ptrdiff_t)r * j->H + u0, 1, 3);
        else
            __builtin_prefetch(j->h_in + (ptrdiff_t)r * j->H + u0, 0, 3);
        __builtin_prefetch(j->h_out + (ptrdiff_t)r * j->H + u0, 1, 3);
    }
    if (j->bias_hn)
        __builtin_prefetch(j->bias_hn + u0, 0, 3);
}

/* The loop over a block, shared by every variant: chunks of MC rows, panels, KC-deep slices of
 * the panel, then MR rows at a time. MK(mr, G, K, A, lda, W, tile, accumulate) is the variant's
 * micro-kernel, LSTM_GATES its LSTM gate loop (lstm_gates_fn). Each sum runs over k in the same
 * order whatever the rows or the split between threads, so results never depend on the thread count. */
#define BLOCK_BODY(MK, MR4, MR3, LSTM_GATES)                                                            \
    {                                                                                                   \
        int G = j->G, G16 = G * LE_PANEL, MR = G == 4 ? MR4 : MR3, K = j->K;                            \
        float tiles[MC * TILE] __attribute__((aligned(64)));                                            \
        /* One row is used; 8 rows' room because GCC merges the micro-kernel calls and then warns of */ \
        /* stores past one row on paths that never run. */                                              \
        float xtile[8 * TILE] __attribute__((aligned(64)));                                             \
        int fused = j->A2 && j->mode == MODE_LSTM, calls = 0;                                           \
        for (int rc = r0; rc < r1; rc += MC) {                                                          \
            int rend = rc + MC < r1 ? rc + MC : r1;                                                     \
            /* A single MR-row call per slice (one row: a GEMV) leaves the weights to the hardware. */   \
            calls = rend - rc > MR ? (rend - rc + MR - 1) / MR : 0;                                     \
            for (int p = p0; p < p1; p++) {                                                             \
                const float *W = j->W + (ptrdiff_t)p * K * G16;                                         \
                const float *W2 = fused ? j->W2 + (ptrdiff_t)p * j->K2 * G16 : NULL;                    \
                const float *after = fused ? W2 : W + (ptrdiff_t)K * G16;                               \
                prefetch_epilogue(j, rc, rend, p);                                                      \
                for (int k0 = 0; k0 < K || k0 == 0; k0 += KC) {                                         \
                    int kc = K - k0 < KC ? K - k0 : KC;                                                 \
                    const float *next = k0 + KC < K ? W + (ptrdiff_t)(k0 + KC) * G16 : after;           \
                    for (int r = rc; r < rend; r += MR) {                                               \
                        int mr = rend - r < MR ? rend - r : MR;                                         \
                        prefetch_part(next, KC * G16, (r - rc) / MR, calls);                            \
                        MK(mr, G, kc, j->A + r * j->lda + k0, j->lda, W + (ptrdiff_t)k0 * G16,          \
                           tiles + (r - rc) * TILE, k0 > 0);                                            \
                    }                                                                                   \
                }                                                                                       \
                if (fused) {                                                                            \
                    /* The step's input product joins the same tiles (x_t rows, W_ih's panel): */       \
                    /* nothing projected ahead and read back (cpu_steps.c says when). */                \
                    for (int k0 = 0; k0 < j->K2; k0 += KC) {                                            \
                        int kc = j->K2 - k0 < KC ? j->K2 - k0 : KC;                                     \
                        const float *next = k0 + KC < j->K2 ? W2 + (ptrdiff_t)(k0 + KC) * G16           \
                                                            : W + (ptrdiff_t)K * G16;            \
                        for (int r = rc; r < rend; r += MR) {                                           \
                            int mr = rend - r < MR ? rend - r : MR;                                     \
                            prefetch_part(next, KC * G16, (r - rc) / MR, calls);                        \
                            MK(mr, G, kc, j->A2 + r * j->lda2 + k0, j->lda2, W2 + (ptrdiff_t)k0 * G16,  \
                               tiles + (r - rc) * TILE, 1);                                             \
                        }                                                                               \
                    }                                                                                   \
                }                                                                                       \
                for (int r = rc; r < rend; r++) {                                                       \
                    float *tile = tiles + (r - rc) * TILE;                                              \
                    const float *add = j->add + (ptrdiff_t)p * G16 + r * j->ld_add;                     \
                    if (j->A2 && j->mode == MODE_GRU) {                                                 \
                        /* One row, one step: the input product kept apart (r multiplies only the */    \
                        /* recurrent part of n), its bias added. */                                     \
                        MK(1, G, j->K2, j->A2, 0, j->W2 + (ptrdiff_t)p * j->K2 * G16, xtile, 0);        \
                        for (int i = 0; i < G16; i++)                                                   \
                            xtile[i] += j->bias[(ptrdiff_t)p * G16 + i];                                \
                        add = xtile;                                                                    \
                    }                                                                                   \
                    epilogue(j, r, tile, p, add, LSTM_GATES);                                           \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
    }

/* -- portable ------------------------------------------------------------------------------ */

INLINE void mk_c_body(const int MR, const int G, int K, const float *A, ptrdiff_t lda, const float *W,
                      float *tile, int accumulate)
{
    int G16 = G * LE_PANEL;
    float acc[8][TILE];
    for (int s = 0; s < MR; s++)
        for (int i = 0; i < G16; i++)
            acc[s][i] = accumulate ? tile[s * TILE + i] : 0.0f;
    for (int k = 0; k < K; k++) {
        const float *w = W + (ptrdiff_t)k * G16;
        for (int s = 0; s < MR; s++) {
            float a = A[s * lda + k];
            for (int i = 0; i < G16; i++)
                acc[s][i] += a * w[i];
        }
    }
    for (int s = 0; s < MR; s++)
        memcpy(tile + s * TILE, acc[s], G16 * sizeof(float));
}

static void mk_c(int mr, int G, int K, const float *A, ptrdiff_t lda, const float *W, float *tile, int accumulate)
{
    switch (mr * 8 + G) {
    case 1 * 8 + 4: mk_c_body(1, 4, K, A, lda, W, tile, accumulate); break;
    case 2 * 8 + 4: mk_c_body(2, 4, K, A, lda, W, tile, accumulate); break;
    case 3 * 8 + 4: mk_c_body(3, 4, K, A, lda, W, tile, accumulate); break;
    case 4 * 8 + 4: mk_c_body(4, 4, K, A, lda, W, tile, accumulate); break;
    case 1 * 8 + 3: mk_c_body(1, 3, K, A, lda, W, tile, accumulate); break;
    case 2 * 8 + 3: mk_c_body(2, 3, K, A, lda, W, tile, accumulate); break;
    case 3 * 8 + 3: mk_c_body(3, 3, K, A, lda, W, tile, accumulate); break;
    default: mk_c_body(4, 3, K, A, lda, W, tile, accumulate); break;
    }
}

static void lstm_gates_c(int n, const float *restrict pre, const float *restrict add, float *restrict c,
                         float *restrict h)
{
    lstm_gates_body(n, pre, add, c, h);
}

static void block_c(const le_block *j, int r0, int r1, int p0, int p1) BLOCK_BODY(mk_c, 4, 4, lstm_gates_c)

/* Portable row-major GEMV: a dot product per row (le_dot_c). */
static void gemv_c(int N, int K, const float *W, ptrdiff_t ldw, const float *x, const float *b, float *y)
{
    for (int r = 0; r < N; r++) {
        float s = le_dot_c(W + r * ldw, x, K);
        y[r] = b ? b[r] + s : s;
    }
}

static void tanh_c(const float *x, float *y, ptrdiff_t n) { tanh_body(x, y, n); }
static void sigmoid_c(const float *x, float *y, ptrdiff_t n) { sigmoid_body(x, y, n); }

const le_variant le_variant_portable = {tanh_c, sigmoid_c, block_c, gemv_c};

#ifdef LE_X86
/* -- AVX2 + FMA ---------------------------------------------------------------------------- */

/* MR rows x G gates x 8 units in ymm accumulators (12 of the 16 registers), one half-panel of 8
 * units after the other: one weight load feeds MR FMAs, one broadcast of A feeds G. One row (a GEMV,
 * bound by reading the weights) takes both halves in one pass instead, 2G sums: half by half it
 * read every line of the panel twice, the second time from L2 (a KC slice is L1's size), and a
 * step of LSTM 512 on AVX2 took 15 % longer than on AVX-512 (Zen 4); each sum runs over k in the
 * same order as before, so the results are the same. */
AVX2 INLINE void mk_avx2_body(const int MR, const int G, int K, const float *A, ptrdiff_t lda, const float *W,
                              float *tile, int accumulate)
{
    const ptrdiff_t ldw = G * LE_PANEL;
    if (MR == 1) {
        __m256 acc[4][2];
        for (int g = 0; g < G; g++)
            for (int half = 0; half < 2; half++)
                acc[g][half] = accumulate ? _mm256_loadu_ps(tile + g * LE_PANEL + half * 8) : _mm256_setzero_ps();
        const float *w = W;
        for (int k = 0; k < K; k++, w += ldw) {
            __m256 a = _mm256_broadcast_ss(A + k);
            for (int g = 0; g < G; g++)
                for (int half = 0; half < 2; half++)
                    acc[g][half] = _mm256_fmadd_ps(_mm256_load_ps(w + g * LE_PANEL + half * 8), a, acc[g][half]);
        }
        for (int g = 0; g < G; g++)
            for (int half = 0; half < 2; half++)
                _mm256_storeu_ps(tile + g * LE_PANEL + half * 8, acc[g][half]);
        return;
    }
    for (int half = 0; half < 2; half++) {
        __m256 acc[4][4];
        for (int s = 0; s < MR; s++)
            for (int g = 0; g < G; g++)
                acc[s][g] = accumulate ? _mm256_loadu_ps(tile + s * TILE + g * LE_PANEL + half * 8)
                                       : _mm256_setzero_ps();
        const float *w = W + half * 8;
        for (int k = 0; k < K; k++, w += ldw) {
            __m256 a[4];
            for (int s = 0; s < MR; s++)
                a[s] = _mm256_broadcast_ss(A + s * lda + k);
            for (int g = 0; g < G; g++) {
                __m256 wg = _mm256_load_ps(w + g * LE_PANEL);
                for (int s = 0; s < MR; s++)
                    acc[s][g] = _mm256_fmadd_ps(wg, a[s], acc[s][g]);
            }
        }
        for (int s = 0; s < MR; s++)
            for (int g = 0; g < G; g++)
                _mm256_storeu_ps(tile + s * TILE + g * LE_PANEL + half * 8, acc[s][g]);
    }
}

AVX2 static void mk_avx2(int mr, int G, int K, const float *A, ptrdiff_t lda, const float *W, float *tile,
                         int accumulate)
{
    switch (mr * 8 + G) {
    case 1 * 8 + 4: mk_avx2_body(1, 4, K, A, lda, W, tile, accumulate); break;
    case 2 * 8 + 4: mk_avx2_body(2, 4, K, A, lda, W, tile, accumulate); break;
    case 3 * 8 + 4: mk_avx2_body(3, 4, K, A, lda, W, tile, accumulate); break;
    case 1 * 8 + 3: mk_avx2_body(1, 3, K, A, lda, W, tile, accumulate); break;
    case 2 * 8 + 3: mk_avx2_body(2, 3, K, A, lda, W, tile, accumulate); break;
    case 3 * 8 + 3: mk_avx2_body(3, 3, K, A, lda, W, tile, accumulate); break;
    default: mk_avx2_body(4, 3, K, A, lda, W, tile, accumulate); break;
    }
}

AVX2 INLINE void lstm_gates_avx2(int n, const float *restrict pre, const float *restrict add, float *restrict c,
                                 float *restrict h)
{
    lstm_gates_body(n, pre, add, c, h);
}

AVX2 static void block_avx2(const le_block *j, int r0, int r1, int p0, int p1) BLOCK_BODY(mk_avx2, 3, 4, lstm_gates_avx2)

/* One row at a time, four sums over k: the weights stream as one contiguous read per thread. Eight rows
 * at a time (eight 2 KB streams 2 KB apart, per step of k) read a 10000 x 512 head at half this speed on
 * Zen 4 from L3 and DRAM: 0.96 -> 0.47 ms on one core when the rest of a token LM's step had been read
 * between heads (a standalone copy of the kernel); AVX-512 loads gave no more. */
AVX2 static void gemv_avx2(int N, int K, const float *W, ptrdiff_t ldw, const float *x, const float *b, float *y)
{
    __m256i m = le_tail_mask_avx2(K);
    for (int r = 0; r < N; r++) {
        const float *w = W + r * ldw;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int k = 0;
        for (; k + 32 <= K; k += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
        }
        for (; k + 8 <= K; k += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        if (k < K) /* the last K % 8 columns through a mask: no scalar tail and no read past a row */
            a1 = _mm256_fmadd_ps(_mm256_maskload_ps(w + k, m), _mm256_maskload_ps(x + k, m), a1);
        float s = le_hsum_avx2(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        y[r] = b ? b[r] + s : s;
    }
}

AVX2 static void tanh_avx2(const float *x, float *y, ptrdiff_t n) { tanh_body(x, y, n); }
AVX2 static void sigmoid_avx2(const float *x, float *y, ptrdiff_t n) { sigmoid_body(x, y, n); }

const le_variant le_variant_avx2 = {tanh_avx2, sigmoid_avx2, block_avx2, gemv_avx2};

/* -- AVX-512 ------------------------------------------------------------------------------- */

/* MR rows x G gates x 16 units in zmm accumulators (24 of the 32 registers: MR = 6 for LSTM, 8 for
 * GRU): per k, G aligned loads of the panel row and MR broadcasts feed MR * G FMAs. One row (a
 * GEMV, bound by reading the weights) keeps two sets of sums over even and odd k, so that 2G
 * independent FMA chains hide the FMA latency. */
AVX512 INLINE void mk_avx512_body(const int MR, const int G, int K, const float *A, ptrdiff_t lda,
                                  const float *W, float *tile, int accumulate)
{
    const ptrdiff_t ldw = G * LE_PANEL;
    __m512 acc[8][4];
    for (int s = 0; s < MR; s++)
        for (int g = 0; g < G; g++)
            acc[s][g] = accumulate ? _mm512_loadu_ps(tile + s * TILE + g * LE_PANEL) : _mm512_setzero_ps();
    const float *w = W;
    int k = 0;
    if (MR == 1) {
        __m512 odd[4];
        for (int g = 0; g < G; g++)
            odd[g] = _mm512_setzero_ps();
        for (; k + 2 <= K; k += 2, w += 2 * ldw) {
            __m512 a0 = _mm512_set1_ps(A[k]), a1 = _mm512_set1_ps(A[k + 1]);
            for (int g = 0; g < G; g++) {
                acc[0][g] = _mm512_fmadd_ps(_mm512_load_ps(w + g * LE_PANEL), a0, acc[0][g]);
                odd[g] = _mm512_fmadd_ps(_mm512_load_ps(w + ldw + g * LE_PANEL), a1, odd[g]);
            }
        }
        for (int g = 0; g < G; g++)
            acc[0][g] = _mm512_add_ps(acc[0][g], odd[g]);
    }
    for (; k < K; k++, w += ldw) {
        __m512 wg[4];
        for (int g = 0; g < G; g++)
            wg[g] = _mm512_load_ps(w + g * LE_PANEL);
        for (int s = 0; s < MR; s++) {
            __m512 a = _mm512_set1_ps(A[s * lda + k]);
            for (int g = 0; g < G; g++)
                acc[s][g] = _mm512_fmadd_ps(wg[g], a, acc[s][g]);
        }
    }
    for (int s = 0; s < MR; s++)
        for (int g = 0; g < G; g++)
            _mm512_storeu_ps(tile + s * TILE + g * LE_PANEL, acc[s][g]);
}

AVX512 static void mk_avx512(int mr, int G, int K, const float *A, ptrdiff_t lda, const float *W, float *tile,
                             int accumulate)
{
    switch (mr * 8 + G) {
    case 1 * 8 + 4: mk_avx512_body(1, 4, K, A, lda, W, tile, accumulate); break;
    case 2 * 8 + 4: mk_avx512_body(2, 4, K, A, lda, W, tile, accumulate); break;
    case 3 * 8 + 4: mk_avx512_body(3, 4, K, A, lda, W, tile, accumulate); break;
    case 4 * 8 + 4: mk_avx512_body(4, 4, K, A, lda, W, tile, accumulate); break;
    case 5 * 8 + 4: mk_avx512_body(5, 4, K, A, lda, W, tile, accumulate); break;
    case 6 * 8 + 4: mk_avx512_body(6, 4, K, A, lda, W, tile, accumulate); break;
    case 1 * 8 + 3: mk_avx512_body(1, 3, K, A, lda, W, tile, accumulate); break;
    case 2 * 8 + 3: mk_avx512_body(2, 3, K, A, lda, W, tile, accumulate); break;
    case 3 * 8 + 3: mk_avx512_body(3, 3, K, A, lda, W, tile, accumulate); break;
    case 4 * 8 + 3: mk_avx512_body(4, 3, K, A, lda, W, tile, accumulate); break;
    case 5 * 8 + 3: mk_avx512_body(5, 3, K, A, lda, W, tile, accumulate); break;
    case 6 * 8 + 3: mk_avx512_body(6, 3, K, A, lda, W, tile, accumulate); break;
    case 7 * 8 + 3: mk_avx512_body(7, 3, K, A, lda, W, tile, accumulate); break;
    default: mk_avx512_body(8, 3, K, A, lda, W, tile, accumulate); break;
    }
}

/* The LSTM gates of 16 units in one register each. The auto-vectorised scalar loop divided (vdivps,
 * ~16 cycles a zmm) five times per 16 units and blended its clamps: with B 64 the gate epilogue was
 * 13 % of the batch workload's time (perf). Here 1/q is rcp14 refined by one Newton step (relative
 * error ~2^-27, below float32's rounding), the same rational otherwise. */
AVX512 INLINE __m512 tanh16(__m512 x)
{
    const __m512 one = _mm512_set1_ps(1.0f), lim = _mm512_set1_ps(TANH_CLAMP);
    /* min/max return their second operand when one is NaN: the constant goes first, NaN passes. */
    __m512 xc = _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), lim), _mm512_min_ps(lim, x));
    __m512 s = _mm512_mul_ps(xc, xc);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(P4), s, _mm512_set1_ps(P3));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(P2));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(P1));
    p = _mm512_fmadd_ps(p, s, _mm512_set1_ps(P0));
    __m512 q = _mm512_fmadd_ps(_mm512_set1_ps(Q4), s, _mm512_set1_ps(Q3));
    q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(Q2));
    q = _mm512_fmadd_ps(q, s, _mm512_set1_ps(Q1));
    q = _mm512_fmadd_ps(q, s, one);
    /* q >= 1: rcp14 is within 2^-14 and one Newton step squares that. */
    __m512 y = _mm512_rcp14_ps(q);
    y = _mm512_fmadd_ps(y, _mm512_fnmadd_ps(q, y, one), y);
    __m512 r = _mm512_mul_ps(_mm512_mul_ps(xc, p), y);
    r = _mm512_max_ps(_mm512_sub_ps(_mm512_setzero_ps(), one), _mm512_min_ps(one, r));
    /* Saturated inputs give exactly +-1, as the scalar tanh_fast. */
    r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, lim, _CMP_GE_OQ), r, one);
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_sub_ps(_mm512_setzero_ps(), lim), _CMP_LE_OQ), r,
                                _mm512_sub_ps(_mm512_setzero_ps(), one));
}

AVX512 INLINE __m512 sigmoid16(__m512 x)
{
    const __m512 half = _mm512_set1_ps(0.5f);
    return _mm512_fmadd_ps(half, tanh16(_mm512_mul_ps(half, x)), half);
}

/* lstm_gates_body for the 16 units of a panel (n < 16 at the last one: masked, nothing read past). */
AVX512 INLINE void lstm_gates_avx512(int n, const float *restrict pre, const float *restrict add, float *restrict c,
                                     float *restrict h)
{
    __mmask16 m = n >= LE_PANEL ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    __m512 i = sigmoid16(_mm512_add_ps(_mm512_loadu_ps(pre), _mm512_loadu_ps(add)));
    __m512 f = sigmoid16(_mm512_add_ps(_mm512_loadu_ps(pre + LE_PANEL), _mm512_loadu_ps(add + LE_PANEL)));
    __m512 g = tanh16(_mm512_add_ps(_mm512_loadu_ps(pre + 2 * LE_PANEL), _mm512_loadu_ps(add + 2 * LE_PANEL)));
    __m512 o = sigmoid16(_mm512_add_ps(_mm512_loadu_ps(pre + 3 * LE_PANEL), _mm512_loadu_ps(add + 3 * LE_PANEL)));
    __m512 cc = _mm512_fmadd_ps(f, _mm512_maskz_loadu_ps(m, c), _mm512_mul_ps(i, g));
    _mm512_mask_storeu_ps(c, m, cc);
    _mm512_mask_storeu_ps(h, m, _mm512_mul_ps(o, tanh16(cc)));
}

AVX512 static void block_avx512(const le_block *j, int r0, int r1, int p0, int p1)
    BLOCK_BODY(mk_avx512, 6, 8, lstm_gates_avx512)

/* The array forms run tanh16/sigmoid16, so that tests/test_kernels_math.py's libm checks cover them. */
#define ARRAY_AVX512(F16)                                                                               \
    {                                                                                                   \
        for (ptrdiff_t i = 0; i < n; i += LE_PANEL) {                                                   \
            __mmask16 m = n - i >= LE_PANEL ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);     \
            _mm512_mask_storeu_ps(y + i, m, F16(_mm512_maskz_loadu_ps(m, x + i)));                     \
        }                                                                                               \
    }

AVX512 static void tanh_avx512(const float *x, float *y, ptrdiff_t n) ARRAY_AVX512(tanh16)
AVX512 static void sigmoid_avx512(const float *x, float *y, ptrdiff_t n) ARRAY_AVX512(sigmoid16)

/* The GEMV is bound by reading the weights: the AVX2 one already keeps up with the caches. */
const le_variant le_variant_avx512 = {tanh_avx512, sigmoid_avx512, block_avx512, gemv_avx2};
#endif

void le_tanh_f32(const float *x, float *y, ptrdiff_t n) { le_variant_in_use()->tanh(x, y, n); }
void le_sigmoid_f32(const float *x, float *y, ptrdiff_t n) { le_variant_in_use()->sigmoid(x, y, n); }

