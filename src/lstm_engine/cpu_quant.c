/* int8 and float16/bfloat16 weight products (see _quant.h): packing, the dynamic quantization of
 * activations, one micro-kernel per variant, and the GEMM over the engine's threads.
 *
 * Variants: portable C; AVX2 (int8 widened to 16 bits for vpmaddwd, F16C); AVX-VNNI (vpdpbusd on
 * ymm); AVX-512 with VNNI (vpdpbusd on zmm, vcvtph2ps). The quantization of activations and the
 * dequantization of the sums are one baseline-compiled function each, shared by every variant: the
 * int32 sums are exact, so int8 results are the same bits whichever variant runs.
 */
#define _GNU_SOURCE
#include "_cpu_impl.h"
#include "_quant.h"

#include <math.h>
#include <string.h>

#ifdef LE_X86
#include <immintrin.h>
#define Q_AVX2 __attribute__((target("avx2,fma,f16c")))
#define Q_AVXVNNI __attribute__((target("avx2,fma,f16c,avxvnni")))
#define Q_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512vnni,avx2,fma,f16c")))
#endif

#define QP LE_PANEL /* output rows per panel */

static int panels(int N) { return (N + QP - 1) / QP; }
static int round4(int K) { return (K + 3) & ~3; }

/* -- packing ------------------------------------------------------------------------------ */

ptrdiff_t le_qmat_size(int kind, int N, int K)
{
    if (kind == LE_W_INT8)
        return (ptrdiff_t)panels(N) * round4(K) * QP;
    return (ptrdiff_t)panels(N) * K * QP * 2;
}

void le_qmat_pack(int kind, const void *src, int N, int K, void *out, int32_t *comp)
{
    int P = panels(N);
    if (kind == LE_W_INT8) {
        const int8_t *w = src;
        int8_t *o = out;
        int Kp = round4(K);
        for (int p = 0; p < P; p++)
            for (int u = 0; u < QP; u++) {
                int n = p * QP + u;
                int32_t sum = 0;
                for (int k = 0; k < Kp; k++) {
                    int8_t v = n < N && k < K ? w[(ptrdiff_t)n * K + k] : 0;
                    o[(ptrdiff_t)p * Kp * QP + (k / 4) * 4 * QP + u * 4 + k % 4] = v;
                    sum += v;
                }
                comp[n] = 128 * sum;
            }
        return;
    }
    const uint16_t *w = src;
    uint16_t *o = out;
    for (int p = 0; p < P; p++)
        for (int u = 0; u < QP; u++) {
            int n = p * QP + u;
            for (int k = 0; k < K; k++)
                o[((ptrdiff_t)p * K + k) * QP + u] = n < N ? w[(ptrdiff_t)n * K + k] : 0;
        }
}

/* -- activations to u8 --------------------------------------------------------------------- */

/* One row of K floats to u8 (see _quant.h), Kp - K bytes of padding 128; returns its scale (NaN when the row
 * is not finite). The reference every variant's quantize_row matches bit for bit. */
static float quantize_row_c(const float *a, int K, int Kp, uint8_t *out)
{
    float mx = 0.0f, finite = 0.0f;
    for (int k = 0; k < K; k++) {
        float v = fabsf(a[k]);
        mx = v > mx ? v : mx;
        finite += a[k] * 0.0f; /* NaN once any element is NaN or infinite */
    }
    if (finite != 0.0f || !(mx > 0.0f)) {
        /* Zeros quantize to zeros; a row that is not finite gives NaN sums, never a wrong number. */
        memset(out, 128, Kp);
        return finite != 0.0f ? NAN : 0.0f;
    }
    float inv = 127.0f / mx;
    for (int k = 0; k < K; k++) {
        /* Round half to even by the 1.5 * 2^23 trick (|x| <= 127): the same in any build, and vectorised. */
        float r = (a[k] * inv + 12582912.0f) - 12582912.0f;
        int q = (int)r;
        q = q > 127 ? 127 : (q < -127 ? -127 : q);
        out[k] = (uint8_t)(q + 128);
    }
    for (int k = K; k < Kp; k++)
        out[k] = 128;
    return mx / 127.0f;
}

/* -- gates --------------------------------------------------------------------------------- */

void le_q_lstm_gates(int H, float *q, const float *bias, float *c, float *h)
{
    for (int j = 0; j < 4 * H; j++)
        q[j] += bias[j];
    le_sigmoid_f32(q, q, 2 * H); /* i, f */
    le_tanh_f32(q + 2 * H, q + 2 * H, H);
    le_sigmoid_f32(q + 3 * H, q + 3 * H, H);
    for (int j = 0; j < H; j++)
        c[j] = q[H + j] * c[j] + q[j] * q[2 * H + j];
    le_tanh_f32(c, h, H);
    for (int j = 0; j < H; j++)
        h[j] *= q[3 * H + j];
}

void le_q_gru_gates(int H, float *q, const float *hq, const float *bias, const float *bias_hn, float *h)
{
    for (int j = 0; j < 2 * H; j++)
        q[j] = q[j] + hq[j] + bias[j];
    le_sigmoid_f32(q, q, 2 * H); /* r, z */
    for (int j = 0; j < H; j++)
        q[2 * H + j] = q[2 * H + j] + bias[2 * H + j] + q[j] * (hq[2 * H + j] + bias_hn[j]);
    le_tanh_f32(q + 2 * H, q + 2 * H, H);
    for (int j = 0; j < H; j++)
        h[j] = (1.0f - q[H + j]) * q[2 * H + j] + q[H + j] * h[j];
}

/* -- half floats --------------------------------------------------------------------------- */

static inline float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f)
        bits = sign | 0x7f800000 | (man << 13);
    else if (exp)
        bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man)
        bits = sign;
    else {
        /* Subnormal: normalise. */
        int e = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            e--;
        }
        bits = sign | ((uint32_t)e << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_f32(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint32_t load_u32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

void le_q_embed_rows(int kind, const void *table, const float *scale, int E, const ptrdiff_t *ids, int B, float *out)
{
    for (int r = 0; r < B; r++) {
        ptrdiff_t id = ids[r];
        float *o = out + (ptrdiff_t)r * E;
        if (kind == LE_W_INT8) {
            const int8_t *q = (const int8_t *)table + id * E;
            for (int k = 0; k < E; k++)
                o[k] = (float)q[k] * scale[id];
        } else {
            const uint16_t *h = (const uint16_t *)table + id * E;
            for (int k = 0; k < E; k++)
                o[k] = kind == LE_W_BFLOAT16 ? bf16_to_f32(h[k]) : f16_to_f32(h[k]);
        }
    }
}

/* -- micro-kernels: mr rows of A by one panel of 16 rows -------------------------------------- */

/* int8: K4 groups of 4; A rows at lda bytes; tile (mr, 16) int32. half: K rows, tile (mr, 16) float. */
typedef void (*mk_i8_fn)(int mr, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W, int32_t *tile);
/* Several rows by np <= WIDE_NP panels at W, W + wstride, ...: row s, panel j of the tile at
 * tile + (s * WIDE_NP + j) * 16. */
#define WIDE_NP 4
typedef void (*mk_i8_wide_fn)(int mr, int np, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W,
                              ptrdiff_t wstride, int32_t *tile);
typedef void (*mk_half_fn)(int bf16, int mr, int K, const float *A, ptrdiff_t lda, const uint16_t *W, float *tile);
typedef void (*mk_half_wide_fn)(int bf16, int mr, int np, int K, const float *A, ptrdiff_t lda, const uint16_t *W,
                                ptrdiff_t wstride, float *tile);

/* A whole panel (16 values) of one row of C: c = (accumulate ? c : 0) + v (+ b[u] when b), where v is
 * (float)(t[u] - comp[u]) * (sa * sc[u]) for int8 and t[u] for float sums; each operation rounded once, in
 * this order, so that every variant stores the same bits. */
typedef void (*store_i8_fn)(const int32_t *t, const int32_t *comp, const float *sc, float sa, float *c,
                            const float *b, int accumulate);
typedef void (*store_f_fn)(const float *t, float *c, const float *b, int accumulate);
typedef float (*quantize_row_fn)(const float *a, int K, int Kp, uint8_t *out);

typedef struct {
    mk_i8_fn mk_i8;
    mk_half_fn mk_half;
    int mr_i8, mr_half;
    quantize_row_fn quantize_row;
    store_i8_fn store_i8;
    store_f_fn store_f;
    /* Or NULL: several rows go through mk_i8 / mk_half too. Both take mr_wide rows. */
    mk_i8_wide_fn mk_i8_wide;
    int mr_wide;
    mk_half_wide_fn mk_half_wide;
} qvariant;

static void store_i8_c(const int32_t *t, const int32_t *comp, const float *sc, float sa, float *c, const float *b,
                       int accumulate)
{
    for (int u = 0; u < QP; u++) {
        float v = (float)(t[u] - comp[u]) * (sa * sc[u]);
        float x = accumulate ? c[u] + v : v;
        c[u] = b ? x + b[u] : x;
    }
}

static void store_f_c(const float *t, float *c, const float *b, int accumulate)
{
    for (int u = 0; u < QP; u++) {
        float x = accumulate ? c[u] + t[u] : t[u];
        c[u] = b ? x + b[u] : x;
    }
}

#define MR_SWITCH(BODY, mr, ...)                                                                            \
    switch (mr) {                                                                                           \
    case 1: BODY(1, __VA_ARGS__); break;                                                                    \
    case 2: BODY(2, __VA_ARGS__); break;                                                                    \
    case 3: BODY(3, __VA_ARGS__); break;                                                                    \
    case 4: BODY(4, __VA_ARGS__); break;                                                                    \
    case 5: BODY(5, __VA_ARGS__); break;                                                                    \
    case 6: BODY(6, __VA_ARGS__); break;                                                                    \
    case 7: BODY(7, __VA_ARGS__); break;                                                                    \
    default: BODY(8, __VA_ARGS__); break;                                                                   \
    }

/* portable */

INLINE void mk_i8_c_body(const int MR, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W, int32_t *tile)
{
    int32_t acc[8][QP];
    memset(acc, 0, sizeof acc);
    for (int k4 = 0; k4 < K4; k4++) {
        const int8_t *w = W + (ptrdiff_t)k4 * 4 * QP;
        for (int s = 0; s < MR; s++) {
            const uint8_t *a = A + s * lda + 4 * k4;
            for (int u = 0; u < QP; u++)
                acc[s][u] += a[0] * w[4 * u] + a[1] * w[4 * u + 1] + a[2] * w[4 * u + 2] + a[3] * w[4 * u + 3];
        }
    }
    memcpy(tile, acc, MR * QP * sizeof(int32_t));
}

static void mk_i8_c(int mr, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W, int32_t *tile)
{
    MR_SWITCH(mk_i8_c_body, mr, K4, A, lda, W, tile)
}

INLINE void mk_half_c_body(const int MR, int bf16, int K, const float *A, ptrdiff_t lda, const uint16_t *W,
                           float *tile)
{
    float acc[8][QP];
    memset(acc, 0, sizeof acc);
    for (int k = 0; k < K; k++) {
        float w[QP];
        for (int u = 0; u < QP; u++)
            w[u] = bf16 ? bf16_to_f32(W[k * QP + u]) : f16_to_f32(W[k * QP + u]);
        for (int s = 0; s < MR; s++) {
            float a = A[s * lda + k];
            for (int u = 0; u < QP; u++)
                acc[s][u] += a * w[u];
        }
    }
    memcpy(tile, acc, MR * QP * sizeof(float));
}

static void mk_half_c(int bf16, int mr, int K, const float *A, ptrdiff_t lda, const uint16_t *W, float *tile)
{
    MR_SWITCH(mk_half_c_body, mr, bf16, K, A, lda, W, tile)
}

static const qvariant q_portable = {mk_i8_c, mk_half_c, 4, 4, quantize_row_c, store_i8_c, store_f_c, NULL, 0, NULL};

#ifdef LE_X86
/* AVX2: 4 rows x 4 k of int8 weights widen to one ymm of int16; vpmaddwd with the row's 4 u8
 * activations (widened, repeated) gives each row two partial sums, added at the end. 3 rows x 4
 * accumulators + 4 weight registers fill the 16 ymm. */
Q_AVX2 INLINE void mk_i8_avx2_body(const int MR, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W,
                                   int32_t *tile)
{
    __m256i acc[3][4];
    for (int s = 0; s < MR; s++)
        for (int q = 0; q < 4; q++)
            acc[s][q] = _mm256_setzero_si256();
    for (int k4 = 0; k4 < K4; k4++) {
        const int8_t *w = W + (ptrdiff_t)k4 * 4 * QP;
        __m256i wq[4];
        for (int q = 0; q < 4; q++)
            wq[q] = _mm256_cvtepi8_epi16(_mm_load_si128((const __m128i *)(w + 16 * q)));
        for (int s = 0; s < MR; s++) {
            __m128i a8 = _mm_cvtsi32_si128((int)load_u32(A + s * lda + 4 * k4));
            __m256i a = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(a8));
            for (int q = 0; q < 4; q++)
                acc[s][q] = _mm256_add_epi32(acc[s][q], _mm256_madd_epi16(wq[q], a));
        }
    }
    for (int s = 0; s < MR; s++)
        for (int q = 0; q < 4; q++) {
            /* lanes (row 4q + i, k 0-1), (row 4q + i, k 2-3) */
            int32_t t[8];
            _mm256_storeu_si256((__m256i *)t, acc[s][q]);
            for (int i = 0; i < 4; i++)
                tile[s * QP + 4 * q + i] = t[2 * i] + t[2 * i + 1];
        }
}

Q_AVX2 static void mk_i8_avx2(int mr, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W, int32_t *tile)
{
    switch (mr) {
    case 1: mk_i8_avx2_body(1, K4, A, lda, W, tile); break;
    case 2: mk_i8_avx2_body(2, K4, A, lda, W, tile); break;
    default: mk_i8_avx2_body(3, K4, A, lda, W, tile); break;
    }
}

/* float16 / bfloat16 widened in registers: 4 rows x 2 halves of 8 units. */
Q_AVX2 INLINE __m256 widen8(int bf16, const uint16_t *w)
{
    __m128i h = _mm_load_si128((const __m128i *)w);
    if (bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* Weights read this many k ahead by one-row kernels: 2 KB, which the hardware prefetcher alone
 * did not keep in flight for the 16 KB panels read one after the other (float16 token-lm CPU time
 * 0.65x float32 without, 0.57x with). */
#define PREFETCH_K 64

Q_AVX2 INLINE void mk_half_avx2_body(const int MR, int bf16, int K, const float *A, ptrdiff_t lda,
                                     const uint16_t *W, float *tile)
{
    __m256 acc[4][2];
    for (int s = 0; s < MR; s++)
        acc[s][0] = acc[s][1] = _mm256_setzero_ps();
    int k = 0;
    if (MR == 1) {
        /* One row: sums over even and odd k, four chains (see the AVX-512 kernel). */
        __m256 odd[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        for (; k + 2 <= K; k += 2) {
            _mm_prefetch((const char *)(W + (k + PREFETCH_K) * QP), _MM_HINT_T0);
            __m256 a0 = _mm256_broadcast_ss(A + k), a1 = _mm256_broadcast_ss(A + k + 1);
            acc[0][0] = _mm256_fmadd_ps(widen8(bf16, W + k * QP), a0, acc[0][0]);
            acc[0][1] = _mm256_fmadd_ps(widen8(bf16, W + k * QP + 8), a0, acc[0][1]);
            odd[0] = _mm256_fmadd_ps(widen8(bf16, W + (k + 1) * QP), a1, odd[0]);
            odd[1] = _mm256_fmadd_ps(widen8(bf16, W + (k + 1) * QP + 8), a1, odd[1]);
        }
        acc[0][0] = _mm256_add_ps(acc[0][0], odd[0]);
        acc[0][1] = _mm256_add_ps(acc[0][1], odd[1]);
    }
    for (; k < K; k++) {
        __m256 w0 = widen8(bf16, W + k * QP), w1 = widen8(bf16, W + k * QP + 8);
        for (int s = 0; s < MR; s++) {
            __m256 a = _mm256_broadcast_ss(A + s * lda + k);
            acc[s][0] = _mm256_fmadd_ps(w0, a, acc[s][0]);
            acc[s][1] = _mm256_fmadd_ps(w1, a, acc[s][1]);
        }
    }
    for (int s = 0; s < MR; s++) {
        _mm256_storeu_ps(tile + s * QP, acc[s][0]);
        _mm256_storeu_ps(tile + s * QP + 8, acc[s][1]);
    }
}

Q_AVX2 static void mk_half_avx2(int bf16, int mr, int K, const float *A, ptrdiff_t lda, const uint16_t *W,
                                float *tile)
{
    switch (mr) {
    case 1: mk_half_avx2_body(1, bf16, K, A, lda, W, tile); break;
    case 2: mk_half_avx2_body(2, bf16, K, A, lda, W, tile); break;
    case 3: mk_half_avx2_body(3, bf16, K, A, lda, W, tile); break;
    default: mk_half_avx2_body(4, bf16, K, A, lda, W, tile); break;
    }
}

static const qvariant q_avx2 = {mk_i8_avx2, mk_half_avx2, 3, 4, quantize_row_c, store_i8_c, store_f_c, NULL, 0, NULL};

/* AVX-VNNI: vpdpbusd on ymm, units 0-7 and 8-15 of each group of 4 k in two registers. */
Q_AVXVNNI INLINE void mk_i8_avxvnni_body(const int MR, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W,
                                         int32_t *tile)
{
    __m256i acc[6][2];
    for (int s = 0; s < MR; s++)
        acc[s][0] = acc[s][1] = _mm256_setzero_si256();
    for (int k4 = 0; k4 < K4; k4++) {
        const int8_t *w = W + (ptrdiff_t)k4 * 4 * QP;
        __m256i w0 = _mm256_load_si256((const __m256i *)w), w1 = _mm256_load_si256((const __m256i *)(w + 32));
        for (int s = 0; s < MR; s++) {
            __m256i a = _mm256_set1_epi32((int)load_u32(A + s * lda + 4 * k4));
            acc[s][0] = _mm256_dpbusd_avx_epi32(acc[s][0], a, w0);
            acc[s][1] = _mm256_dpbusd_avx_epi32(acc[s][1], a, w1);
        }
    }
    for (int s = 0; s < MR; s++) {
        _mm256_storeu_si256((__m256i *)(tile + s * QP), acc[s][0]);
        _mm256_storeu_si256((__m256i *)(tile + s * QP + 8), acc[s][1]);
    }
}

Q_AVXVNNI static void mk_i8_avxvnni(int mr, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W,
                                    int32_t *tile)
{
    switch (mr) {
    case 1: mk_i8_avxvnni_body(1, K4, A, lda, W, tile); break;
    case 2: mk_i8_avxvnni_body(2, K4, A, lda, W, tile); break;
    case 3: mk_i8_avxvnni_body(3, K4, A, lda, W, tile); break;
    case 4: mk_i8_avxvnni_body(4, K4, A, lda, W, tile); break;
    case 5: mk_i8_avxvnni_body(5, K4, A, lda, W, tile); break;
    default: mk_i8_avxvnni_body(6, K4, A, lda, W, tile); break;
    }
}

static const qvariant q_avxvnni = {mk_i8_avxvnni, mk_half_avx2, 6, 4, quantize_row_c, store_i8_c, store_f_c, NULL, 0, NULL};

/* AVX-512 VNNI: one zmm of 16 units per row; one row (a GEMV, bound by reading the weights) keeps
 * four sums over k4 mod 4 so that four vpdpbusd chains hide its latency (integer sums: exact). */
Q_AVX512 INLINE void mk_i8_avx512_body(const int MR, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W,
                                       int32_t *tile)
{
    __m512i acc[8];
    for (int s = 0; s < MR; s++)
        acc[s] = _mm512_setzero_si512();
    int k4 = 0;
    if (MR == 1) {
        __m512i b1 = _mm512_setzero_si512(), b2 = b1, b3 = b1;
        for (; k4 + 4 <= K4; k4 += 4) {
            const int8_t *w = W + (ptrdiff_t)k4 * 4 * QP;
            acc[0] = _mm512_dpbusd_epi32(acc[0], _mm512_set1_epi32((int)load_u32(A + 4 * k4)),
                                         _mm512_load_si512(w));
            b1 = _mm512_dpbusd_epi32(b1, _mm512_set1_epi32((int)load_u32(A + 4 * k4 + 4)), _mm512_load_si512(w + 64));
            b2 = _mm512_dpbusd_epi32(b2, _mm512_set1_epi32((int)load_u32(A + 4 * k4 + 8)), _mm512_load_si512(w + 128));
            b3 = _mm512_dpbusd_epi32(b3, _mm512_set1_epi32((int)load_u32(A + 4 * k4 + 12)), _mm512_load_si512(w + 192));
        }
        acc[0] = _mm512_add_epi32(_mm512_add_epi32(acc[0], b1), _mm512_add_epi32(b2, b3));
    }
    for (; k4 < K4; k4++) {
        __m512i w = _mm512_load_si512(W + (ptrdiff_t)k4 * 4 * QP);
        for (int s = 0; s < MR; s++)
            acc[s] = _mm512_dpbusd_epi32(acc[s], _mm512_set1_epi32((int)load_u32(A + s * lda + 4 * k4)), w);
    }
    for (int s = 0; s < MR; s++)
        _mm512_storeu_si512(tile + s * QP, acc[s]);
}

Q_AVX512 static void mk_i8_avx512(int mr, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W, int32_t *tile)
{
    MR_SWITCH(mk_i8_avx512_body, mr, K4, A, lda, W, tile)
}

Q_AVX512 INLINE __m512 widen16(int bf16, const uint16_t *w)
{
    __m256i h = _mm256_load_si256((const __m256i *)w);
    if (bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

Q_AVX512 INLINE void mk_half_avx512_body(const int MR, int bf16, int K, const float *A, ptrdiff_t lda,
                                         const uint16_t *W, float *tile)
{
    __m512 acc[8];
    for (int s = 0; s < MR; s++)
        acc[s] = _mm512_setzero_ps();
    int k = 0;
    if (MR == 1 && bf16) {
        /* bfloat16, one row: rows k and k + 1 of the panel are 16 pairs of halves in one zmm; a shift widens
         * the first half of every pair, a mask the second (no vpmovzxwd, which bound the widening below on
         * Zen 4: 10000 x 512 on one core 168 -> 150 us, 61 -> 69 GB/s of weights). Lanes 0-7 sum units
         * 0, 2, .. 14 (shift) or 1, 3, .. 15 (mask) over even k, lanes 8-15 over odd k. */
        const __m512i second = _mm512_set1_epi32((int)0xFFFF0000);
        __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0;
        for (; k + 4 <= K; k += 4) {
            _mm_prefetch((const char *)(W + (k + PREFETCH_K) * QP), _MM_HINT_T0);
            _mm_prefetch((const char *)(W + (k + PREFETCH_K + 2) * QP), _MM_HINT_T0);
            __m512i v0 = _mm512_loadu_si512(W + k * QP), v1 = _mm512_loadu_si512(W + (k + 2) * QP);
            __m512 x0 = _mm512_insertf32x8(_mm512_set1_ps(A[k]), _mm256_set1_ps(A[k + 1]), 1);
            __m512 x1 = _mm512_insertf32x8(_mm512_set1_ps(A[k + 2]), _mm256_set1_ps(A[k + 3]), 1);
            e0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v0, 16)), x0, e0);
            o0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v0, second)), x0, o0);
            e1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v1, 16)), x1, e1);
            o1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v1, second)), x1, o1);
        }
        __m512 e = _mm512_add_ps(e0, e1), o = _mm512_add_ps(o0, o1);
        __m256 ev = _mm256_add_ps(_mm512_castps512_ps256(e), _mm512_extractf32x8_ps(e, 1)); /* units 2j */
        __m256 od = _mm256_add_ps(_mm512_castps512_ps256(o), _mm512_extractf32x8_ps(o, 1)); /* units 2j + 1 */
        __m256 a = _mm256_unpacklo_ps(ev, od), b = _mm256_unpackhi_ps(ev, od); /* units 0-3 8-11, 4-7 12-15 */
        acc[0] = _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_permute2f128_ps(a, b, 0x20)),
                                    _mm256_permute2f128_ps(a, b, 0x31), 1);
    } else if (MR == 1) {
        /* One row (a batch-1 step, bound by reading the weights): four sums over k mod 4, so that
         * four FMA chains keep up with one widening per cycle; two chains left it latency-bound
         * at half that (token-lm float16 0.71x float32 in CPU time, where half the bytes allow 0.5). */
        __m512 part[3] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (; k + 4 <= K; k += 4) {
            _mm_prefetch((const char *)(W + (k + PREFETCH_K) * QP), _MM_HINT_T0);
            _mm_prefetch((const char *)(W + (k + PREFETCH_K + 2) * QP), _MM_HINT_T0);
            acc[0] = _mm512_fmadd_ps(widen16(bf16, W + k * QP), _mm512_set1_ps(A[k]), acc[0]);
            for (int l = 0; l < 3; l++)
                part[l] = _mm512_fmadd_ps(widen16(bf16, W + (k + 1 + l) * QP), _mm512_set1_ps(A[k + 1 + l]), part[l]);
        }
        acc[0] = _mm512_add_ps(_mm512_add_ps(acc[0], part[0]), _mm512_add_ps(part[1], part[2]));
    }
    for (; k < K; k++) {
        __m512 w = widen16(bf16, W + k * QP);
        for (int s = 0; s < MR; s++)
            acc[s] = _mm512_fmadd_ps(w, _mm512_set1_ps(A[s * lda + k]), acc[s]);
    }
    for (int s = 0; s < MR; s++)
        _mm512_storeu_ps(tile + s * QP, acc[s]);
}

Q_AVX512 static void mk_half_avx512(int bf16, int mr, int K, const float *A, ptrdiff_t lda, const uint16_t *W,
                                    float *tile)
{
    MR_SWITCH(mk_half_avx512_body, mr, bf16, K, A, lda, W, tile)
}

/* The quantization of activations and the stores of sums, vectorised: they took 9 % and 15 % of an int8
 * batch LSTM in their baseline (SSE2) form. The same bits as quantize_row_c / store_*_c: explicit
 * rounding (the *_round_ps forms) keeps GCC from contracting a multiply and an add into an FMA, which
 * rounds once where the reference rounds twice; cvtps_epi32 rounds half to even like the reference's
 * 1.5 * 2^23 trick (default rounding mode in both). */
#define RN (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

Q_AVX512 static float quantize_row_avx512(const float *a, int K, int Kp, uint8_t *out)
{
    __m512 mx = _mm512_setzero_ps(), finite = _mm512_setzero_ps();
    for (int k = 0; k < K; k += 16) {
        __mmask16 in = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(in, a + k);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
        finite = _mm512_add_ps(finite, _mm512_mul_ps(v, _mm512_setzero_ps())); /* NaN once one is not finite */
    }
    float m = _mm512_reduce_max_ps(mx), f = _mm512_reduce_add_ps(finite);
    if (f != 0.0f || !(m > 0.0f)) {
        memset(out, 128, Kp);
        return f != 0.0f ? NAN : 0.0f;
    }
    float inv = 127.0f / m;
    __m512 vinv = _mm512_set1_ps(inv);
    __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), off = _mm512_set1_epi32(128);
    for (int k = 0; k < K; k += 16) {
        __mmask16 in = K - k >= 16 ? 0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_round_ps(_mm512_maskz_loadu_ps(in, a + k), vinv, RN));
        q = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(q, lo), hi), off);
        _mm512_mask_cvtepi32_storeu_epi8(out + k, in, q);
    }
    for (int k = K; k < Kp; k++)
        out[k] = 128;
    return m / 127.0f;
}

Q_AVX512 static void store_i8_avx512(const int32_t *t, const int32_t *comp, const float *sc, float sa, float *c,
                                     const float *b, int accumulate)
{
    __m512i d = _mm512_sub_epi32(_mm512_loadu_si512(t), _mm512_loadu_si512(comp));
    __m512 scale = _mm512_mul_round_ps(_mm512_set1_ps(sa), _mm512_loadu_ps(sc), RN);
    __m512 x = _mm512_mul_round_ps(_mm512_cvtepi32_ps(d), scale, RN);
    if (accumulate)
        x = _mm512_add_round_ps(_mm512_loadu_ps(c), x, RN);
    if (b)
        x = _mm512_add_round_ps(x, _mm512_loadu_ps(b), RN);
    _mm512_storeu_ps(c, x);
}

Q_AVX512 static void store_f_avx512(const float *t, float *c, const float *b, int accumulate)
{
    __m512 x = _mm512_loadu_ps(t);
    if (accumulate)
        x = _mm512_add_round_ps(_mm512_loadu_ps(c), x, RN);
    if (b)
        x = _mm512_add_round_ps(x, _mm512_loadu_ps(b), RN);
    _mm512_storeu_ps(c, x);
}

/* Several rows (a batch): up to 6 rows by 4 panels in 24 accumulators, so that one broadcast of a
 * row's 4 activations serves 4 vpdpbusd and one weight load 6 of them (0.42 loads per vpdpbusd;
 * mk_i8_avx512's 8 rows x 1 panel take 1.1 and were load-bound). The accumulators are named
 * variables and vpdpbusd is written out: with _mm512_dpbusd_epi32 GCC 12 copies the accumulator
 * to a new register at every call, and with an array of them it kept the array on the stack. */
#define DPBUSD512(acc, a, w) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w))
#define WROW(s)                                                                                             \
    if (MR > s) {                                                                                           \
        __m512i a = _mm512_set1_epi32((int)load_u32(A + s * lda + 4 * k4));                                \
        DPBUSD512(c##s##0, a, w0);                                                                          \
        if (NP > 1) DPBUSD512(c##s##1, a, w1);                                                              \
        if (NP > 2) DPBUSD512(c##s##2, a, w2);                                                              \
        if (NP > 3) DPBUSD512(c##s##3, a, w3);                                                              \
    }
#define WDECL(s) __m512i c##s##0 = _mm512_setzero_si512(), c##s##1 = c##s##0, c##s##2 = c##s##0, c##s##3 = c##s##0;
#define WSTORE(s)                                                                                           \
    if (MR > s) {                                                                                           \
        int32_t *t = tile + s * WIDE_NP * QP;                                                               \
        _mm512_store_si512(t, c##s##0);                                                                     \
        if (NP > 1) _mm512_store_si512(t + QP, c##s##1);                                                    \
        if (NP > 2) _mm512_store_si512(t + 2 * QP, c##s##2);                                                \
        if (NP > 3) _mm512_store_si512(t + 3 * QP, c##s##3);                                                \
    }

Q_AVX512 INLINE void mk_i8_wide_avx512_body(const int MR, const int NP, int K4, const uint8_t *A, ptrdiff_t lda,
                                            const int8_t *W, ptrdiff_t wstride, int32_t *tile)
{
    WDECL(0) WDECL(1) WDECL(2) WDECL(3) WDECL(4) WDECL(5)
    __m512i w0 = _mm512_setzero_si512(), w1 = w0, w2 = w0, w3 = w0;
    for (int k4 = 0; k4 < K4; k4++) {
        const int8_t *w = W + (ptrdiff_t)k4 * 4 * QP;
        w0 = _mm512_load_si512(w);
        if (NP > 1) w1 = _mm512_load_si512(w + wstride);
        if (NP > 2) w2 = _mm512_load_si512(w + 2 * wstride);
        if (NP > 3) w3 = _mm512_load_si512(w + 3 * wstride);
        WROW(0) WROW(1) WROW(2) WROW(3) WROW(4) WROW(5)
    }
    WSTORE(0) WSTORE(1) WSTORE(2) WSTORE(3) WSTORE(4) WSTORE(5)
}

#define WIDE_CASE(mr, np)                                                                                   \
    case mr * 8 + np: mk_i8_wide_avx512_body(mr, np, K4, A, lda, W, wstride, tile); break;
#define WIDE_ROW(mr) WIDE_CASE(mr, 1) WIDE_CASE(mr, 2) WIDE_CASE(mr, 3) WIDE_CASE(mr, 4)

Q_AVX512 static void mk_i8_wide_avx512(int mr, int np, int K4, const uint8_t *A, ptrdiff_t lda, const int8_t *W,
                                       ptrdiff_t wstride, int32_t *tile)
{
    /* Every shape has its case: the 6 x 4 one read 4 panels for a last group of fewer, past the weight's
     * end (a segfault once units of a few panels made that group start near the end). */
    switch (mr * 8 + np) {
        WIDE_ROW(1) WIDE_ROW(2) WIDE_ROW(3) WIDE_ROW(4) WIDE_ROW(5) WIDE_CASE(6, 1) WIDE_CASE(6, 2) WIDE_CASE(6, 3)
    default: mk_i8_wide_avx512_body(6, 4, K4, A, lda, W, wstride, tile); break;
    }
}

/* float16 / bfloat16, several rows: the same 6 x 4 shape, each panel row widened once for 6 rows (one
 * panel at a time widened it for 8 FMAs behind 9 loads: a float16 batch LSTM ran 1.2x float32). */
#define HROW(s)                                                                                             \
    if (MR > s) {                                                                                           \
        __m512 a = _mm512_set1_ps(A[s * lda + k]);                                                          \
        h##s##0 = _mm512_fmadd_ps(w0, a, h##s##0);                                                          \
        if (NP > 1) h##s##1 = _mm512_fmadd_ps(w1, a, h##s##1);                                              \
        if (NP > 2) h##s##2 = _mm512_fmadd_ps(w2, a, h##s##2);                                              \
        if (NP > 3) h##s##3 = _mm512_fmadd_ps(w3, a, h##s##3);                                              \
    }
#define HDECL(s) __m512 h##s##0 = _mm512_setzero_ps(), h##s##1 = h##s##0, h##s##2 = h##s##0, h##s##3 = h##s##0;
#define HSTORE(s)                                                                                           \
    if (MR > s) {                                                                                           \
        float *t = tile + s * WIDE_NP * QP;                                                                 \
        _mm512_store_ps(t, h##s##0);                                                                        \
        if (NP > 1) _mm512_store_ps(t + QP, h##s##1);                                                       \
        if (NP > 2) _mm512_store_ps(t + 2 * QP, h##s##2);                                                   \
        if (NP > 3) _mm512_store_ps(t + 3 * QP, h##s##3);                                                   \
    }

Q_AVX512 INLINE void mk_half_wide_avx512_body(const int MR, const int NP, int bf16, int K, const float *A,
                                              ptrdiff_t lda, const uint16_t *W, ptrdiff_t wstride, float *tile)
{
    HDECL(0) HDECL(1) HDECL(2) HDECL(3) HDECL(4) HDECL(5)
    __m512 w0 = _mm512_setzero_ps(), w1 = w0, w2 = w0, w3 = w0;
    for (int k = 0; k < K; k++) {
        const uint16_t *w = W + (ptrdiff_t)k * QP;
        w0 = widen16(bf16, w);
        if (NP > 1) w1 = widen16(bf16, w + wstride);
        if (NP > 2) w2 = widen16(bf16, w + 2 * wstride);
        if (NP > 3) w3 = widen16(bf16, w + 3 * wstride);
        HROW(0) HROW(1) HROW(2) HROW(3) HROW(4) HROW(5)
    }
    HSTORE(0) HSTORE(1) HSTORE(2) HSTORE(3) HSTORE(4) HSTORE(5)
}

#define HWIDE_CASE(mr, np)                                                                                  \
    case mr * 8 + np: mk_half_wide_avx512_body(mr, np, bf16, K, A, lda, W, wstride, tile); break;
#define HWIDE_ROW(mr) HWIDE_CASE(mr, 1) HWIDE_CASE(mr, 2) HWIDE_CASE(mr, 3) HWIDE_CASE(mr, 4)

Q_AVX512 static void mk_half_wide_avx512(int bf16, int mr, int np, int K, const float *A, ptrdiff_t lda,
                                         const uint16_t *W, ptrdiff_t wstride, float *tile)
{
    switch (mr * 8 + np) { /* every shape has its case, as mk_i8_wide_avx512's */
        HWIDE_ROW(1) HWIDE_ROW(2) HWIDE_ROW(3) HWIDE_ROW(4) HWIDE_ROW(5)
        HWIDE_CASE(6, 1) HWIDE_CASE(6, 2) HWIDE_CASE(6, 3)
    default: mk_half_wide_avx512_body(6, 4, bf16, K, A, lda, W, wstride, tile); break;
    }
}

static const qvariant q_avx512 = {mk_i8_avx512, mk_half_avx512, 8, 8, quantize_row_avx512, store_i8_avx512,
                                  store_f_avx512, mk_i8_wide_avx512, 6, mk_half_wide_avx512};
#endif

/* -- which variant ------------------------------------------------------------------------- */

static const char *const q_names[LE_Q_NUM_VARIANTS] = {"portable", "avx2", "avxvnni", "avx512vnni"};
static const char *q_reasons[LE_Q_NUM_VARIANTS];
static int q_detected = -1, q_forced = -1, q_has_avxvnni;

static void q_detect(void)
{
    if (q_detected >= 0)
        return;
    q_detected = LE_Q_PORTABLE;
    q_reasons[LE_Q_PORTABLE] = "baseline x86-64 C, runs everywhere";
#ifdef LE_X86
    __builtin_cpu_init();
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    /* F16C: CPUID leaf 1, ECX bit 29 (GCC 12 has no __builtin_cpu_supports name for it). */
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
    int f16c = (c >> 29) & 1;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
    int avxvnni = (a >> 4) & 1; /* leaf 7 subleaf 1, EAX bit 4 */
    int avx512 = le_simd_detected() >= LE_AVX512 && __builtin_cpu_supports("avx512vnni");
    q_reasons[LE_Q_AVX2] = !avx2 ? "the CPU lacks AVX2/FMA" : !f16c ? "the CPU lacks F16C" : "the CPU has AVX2, FMA, F16C";
    if (avx2 && f16c)
        q_detected = LE_Q_AVX2;
    q_reasons[LE_Q_AVXVNNI] = q_detected < LE_Q_AVX2 ? "the CPU lacks AVX2/FMA/F16C"
                              : !avxvnni ? "the CPU lacks AVX-VNNI" : "the CPU has AVX-VNNI";
    q_has_avxvnni = q_detected == LE_Q_AVX2 && avxvnni;
    if (q_has_avxvnni)
        q_detected = LE_Q_AVXVNNI;
    q_reasons[LE_Q_AVX512] = q_detected < LE_Q_AVX2 ? "the CPU lacks AVX2/FMA/F16C"
                             : !avx512 ? "the CPU (or the OS) lacks AVX-512 F/VL/BW/DQ with VNNI"
                                       : "the CPU has AVX-512 F/VL/BW/DQ and VNNI";
    if (q_detected >= LE_Q_AVX2 && avx512)
        q_detected = LE_Q_AVX512;
#else
    q_reasons[1] = q_reasons[2] = q_reasons[3] = "not an x86 CPU";
#endif
}

int le_q_detected(void)
{
    q_detect();
    return q_detected;
}

int le_q_level(void)
{
    if (q_forced >= 0)
        return q_forced;
    int best = le_q_detected(), cap = le_simd_level();
    /* The float32 variant forced down caps the products too: portable -> portable, AVX2 -> no AVX-512. */
    if (cap == LE_PORTABLE)
        return LE_Q_PORTABLE;
    if (cap == LE_AVX2 && best == LE_Q_AVX512)
        return q_has_avxvnni ? LE_Q_AVXVNNI : LE_Q_AVX2;
    return best;
}

int le_q_supported(int level)
{
    q_detect();
    return level >= 0 && level <= q_detected && (level != LE_Q_AVXVNNI || q_has_avxvnni);
}

int le_q_set_level(int level)
{
    if (level >= LE_Q_NUM_VARIANTS || (level >= 0 && !le_q_supported(level)))
        return -1;
    q_forced = level < 0 ? -1 : level;
    return 0;
}

const char *le_q_name(int level) { return level >= 0 && level < LE_Q_NUM_VARIANTS ? q_names[level] : "unknown"; }

const char *le_q_reason(int level)
{
    q_detect();
    return level >= 0 && level < LE_Q_NUM_VARIANTS ? q_reasons[level] : "no such variant";
}

static const qvariant *q_in_use(void)
{
#ifdef LE_X86
    switch (le_q_level()) {
    case LE_Q_AVX512: return &q_avx512;
    case LE_Q_AVXVNNI: return &q_avxvnni;
    case LE_Q_AVX2: return &q_avx2;
    }
#endif
    return &q_portable;
}

/* -- the GEMM ------------------------------------------------------------------------------ */

typedef struct {
    const le_qmat *m;
    const qvariant *v;
    int M, accumulate;
    const float *A, *bias;
    ptrdiff_t lda, ldc;
    float *C;
    const uint8_t *au8;  /* int8: the rows of A quantized, Kp bytes each */
    const float *sa;     /* and their scales */
    int per_unit;        /* panels of a unit (le_run_units) */
} qjob;

#define RC_MAX 64

/* Row r of C, the last panel p when it is not whole: the first N - 16p of the 16 values (int8: dequantized
 * as store_i8_c does). Whole panels go to the variant's store_i8 / store_f. */
static void store_partial(const qjob *jb, int r, int p, const int32_t *t, float sa, const float *v)
{
    int n0 = p * QP, nn = jb->m->N - n0;
    float *c = jb->C + r * jb->ldc + n0;
    const float *b = jb->bias ? jb->bias + n0 : NULL;
    for (int u = 0; u < nn; u++) {
        float x = t ? (float)(t[u] - jb->m->comp[n0 + u]) * (sa * jb->m->scale[n0 + u]) : v[u];
        x = jb->accumulate ? c[u] + x : x;
        c[u] = b ? x + b[u] : x;
    }
}

/* Row r of C, panel p, from one row of an int8 tile (t: 16 sums) and the row's activation scale sa. */
static inline void store_i8_tile(const qjob *jb, int r, int p, const int32_t *t, float sa)
{
    if (p < jb->m->N / QP)
        jb->v->store_i8(t, jb->m->comp + p * QP, jb->m->scale + p * QP, sa, jb->C + r * jb->ldc + p * QP,
                        jb->bias ? jb->bias + p * QP : NULL, jb->accumulate);
    else
        store_partial(jb, r, p, t, sa, NULL);
}

/* Row r of C, panel p, from one row of a float tile (16 sums). */
static inline void store_f_tile(const qjob *jb, int r, int p, const float *t)
{
    if (p < jb->m->N / QP)
        jb->v->store_f(t, jb->C + r * jb->ldc + p * QP, jb->bias ? jb->bias + p * QP : NULL, jb->accumulate);
    else
        store_partial(jb, r, p, NULL, 0.0f, t);
}

/* Rows [r0, r1) of A (quantized in abuf with scales sa for int8) by panels [p0, p1). */
static void qgemm_block(const qjob *jb, int r0, int r1, int p0, int p1, const uint8_t *abuf, const float *sa)
{
    const le_qmat *m = jb->m;
    const qvariant *v = jb->v;
    if (m->kind == LE_W_INT8) {
        int Kp = round4(m->K);
        int32_t tile[8 * WIDE_NP * QP] __attribute__((aligned(64)));
        if (v->mk_i8_wide && r1 - r0 > 1) {
            for (int p = p0; p < p1; p += WIDE_NP) {
                int np = p1 - p < WIDE_NP ? p1 - p : WIDE_NP;
                const int8_t *Wp = (const int8_t *)m->w + (ptrdiff_t)p * Kp * QP;
                for (int r = r0; r < r1; r += v->mr_wide) {
                    int mr = r1 - r < v->mr_wide ? r1 - r : v->mr_wide;
                    v->mk_i8_wide(mr, np, Kp / 4, abuf + (ptrdiff_t)(r - r0) * Kp, Kp, Wp, (ptrdiff_t)Kp * QP, tile);
                    for (int s = 0; s < mr; s++)
                        for (int j = 0; j < np; j++)
                            store_i8_tile(jb, r + s, p + j, tile + (s * WIDE_NP + j) * QP, sa[r - r0 + s]);
                }
            }
            return;
        }
        for (int p = p0; p < p1; p++) {
            const int8_t *Wp = (const int8_t *)m->w + (ptrdiff_t)p * Kp * QP;
            for (int r = r0; r < r1; r += v->mr_i8) {
                int mr = r1 - r < v->mr_i8 ? r1 - r : v->mr_i8;
                v->mk_i8(mr, Kp / 4, abuf + (ptrdiff_t)(r - r0) * Kp, Kp, Wp, tile);
                for (int s = 0; s < mr; s++)
                    store_i8_tile(jb, r + s, p, tile + s * QP, sa[r - r0 + s]);
            }
        }
        return;
    }
    int bf16 = m->kind == LE_W_BFLOAT16;
    float tile[8 * WIDE_NP * QP] __attribute__((aligned(64)));
    if (v->mk_half_wide && r1 - r0 > 1) {
        for (int p = p0; p < p1; p += WIDE_NP) {
            int np = p1 - p < WIDE_NP ? p1 - p : WIDE_NP;
            const uint16_t *Wp = (const uint16_t *)m->w + (ptrdiff_t)p * m->K * QP;
            for (int r = r0; r < r1; r += v->mr_wide) {
                int mr = r1 - r < v->mr_wide ? r1 - r : v->mr_wide;
                v->mk_half_wide(bf16, mr, np, m->K, jb->A + r * jb->lda, jb->lda, Wp, (ptrdiff_t)m->K * QP, tile);
                for (int s = 0; s < mr; s++)
                    for (int j = 0; j < np; j++)
                        store_f_tile(jb, r + s, p + j, tile + (s * WIDE_NP + j) * QP);
            }
        }
        return;
    }
    for (int p = p0; p < p1; p++) {
        const uint16_t *Wp = (const uint16_t *)m->w + (ptrdiff_t)p * m->K * QP;
        for (int r = r0; r < r1; r += v->mr_half) {
            int mr = r1 - r < v->mr_half ? r1 - r : v->mr_half;
            v->mk_half(bf16, mr, m->K, jb->A + r * jb->lda, jb->lda, Wp, tile);
            for (int s = 0; s < mr; s++)
                store_f_tile(jb, r + s, p, tile + s * QP);
        }
    }
}

/* Panels [p0, p1) of a job, every row. */
static void qgemm_panels(const qjob *jb, int p0, int p1)
{
    int Kp = round4(jb->m->K);
    /* Row chunks: the panels of a unit are read from L2 once per chunk. */
    for (int r0 = 0; r0 < jb->M; r0 += RC_MAX) {
        int r1 = r0 + RC_MAX < jb->M ? r0 + RC_MAX : jb->M;
        qgemm_block(jb, r0, r1, p0, p1, jb->au8 + (ptrdiff_t)r0 * Kp, jb->sa + r0);
    }
}

static void qgemm_unit(void *arg, int u)
{
    const qjob *jb = arg;
    int P = panels(jb->m->N);
    int p0 = u * jb->per_unit, p1 = p0 + jb->per_unit < P ? p0 + jb->per_unit : P;
    qgemm_panels(jb, p0, p1);
}

ptrdiff_t le_qgemm_scratch(int M, int K)
{
    return (ptrdiff_t)M * round4(K) + (ptrdiff_t)M * sizeof(float) + 64;
}

/* Below this many bytes of weights read per call (times the rows) one thread does it all: a second
 * thread's wake-up and join cost more (the float32 kernels use the same figure). */
#define Q_PARALLEL_MIN_BYTES (256 * 1024)

/* A job of the product, its int8 rows quantized (each row once, here: a thread per unit would quantize
 * every row again); returns the bytes of weights it reads. */
static double qjob_init(qjob *jb, const le_qmat *m, int M, const float *A, ptrdiff_t lda, float *C, ptrdiff_t ldc,
                        int accumulate, const float *bias, void *scratch)
{
    *jb = (qjob){m, q_in_use(), M, accumulate, A, bias, lda, ldc, C, NULL, NULL, 0};
    if (m->kind == LE_W_INT8) {
        int Kp = round4(m->K);
        uint8_t *au8 = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
        float *sa = (float *)(au8 + (ptrdiff_t)M * Kp);
        for (int r = 0; r < M; r++)
            sa[r] = jb->v->quantize_row(A + r * lda, m->K, Kp, au8 + (ptrdiff_t)r * Kp);
        jb->au8 = au8;
        jb->sa = sa;
    }
    return (double)le_qmat_size(m->kind, m->N, m->K) * M;
}

/* Threads for a product of P panels reading `bytes`, and the panels of a unit (set in jb). A few units per
 * thread: one that joins late, or never, leaves little for the others. Each thread owns a range of them
 * (le_run_units): a layer's step reads the same panels on the same core at every step. */
static int q_split(qjob *jb, double bytes, int nthreads)
{
    int P = panels(jb->m->N);
    if (bytes < Q_PARALLEL_MIN_BYTES)
        nthreads = 1;
    if (nthreads > P)
        nthreads = P;
    int want = nthreads > 1 ? 4 * nthreads : 1;
    jb->per_unit = (P + want - 1) / want;
    return nthreads;
}

int le_qgemm(const le_qmat *m, int M, const float *A, ptrdiff_t lda, float *C, ptrdiff_t ldc, int accumulate,
             const float *bias, int nthreads, void *scratch)
{
    qjob jb;
    if (M <= 0)
        return 0;
    double bytes = qjob_init(&jb, m, M, A, lda, C, ldc, accumulate, bias, scratch);
    nthreads = q_split(&jb, bytes, nthreads);
    int P = panels(m->N);
    return le_run_units((P + jb.per_unit - 1) / jb.per_unit, qgemm_unit, &jb, nthreads, bytes * 8);
}

/* Two products of as many panels: a unit runs its panels of the first, then the same panels of the second. */
static void qpair_unit(void *arg, int u)
{
    const qjob *jb = arg;
    int P = panels(jb[0].m->N);
    int p0 = u * jb[0].per_unit, p1 = p0 + jb[0].per_unit < P ? p0 + jb[0].per_unit : P;
    qgemm_panels(&jb[0], p0, p1);
    qgemm_panels(&jb[1], p0, p1);
}

int le_qgemm_pair(const le_qmat *m1, const float *A1, ptrdiff_t lda1, float *C1, ptrdiff_t ldc1, int acc1,
                  const le_qmat *m2, const float *A2, ptrdiff_t lda2, float *C2, ptrdiff_t ldc2, int acc2,
                  int M, int nthreads, void *scratch)
{
    if (M <= 0)
        return 0;
    if (m1->N != m2->N) {
        int a = le_qgemm(m1, M, A1, lda1, C1, ldc1, acc1, NULL, nthreads, scratch);
        int b = le_qgemm(m2, M, A2, lda2, C2, ldc2, acc2, NULL, nthreads, scratch);
        return a > b ? a : b;
    }
    qjob jb[2];
    int K = m1->K > m2->K ? m1->K : m2->K;
    double bytes = qjob_init(&jb[0], m1, M, A1, lda1, C1, ldc1, acc1, NULL, scratch)
                   + qjob_init(&jb[1], m2, M, A2, lda2, C2, ldc2, acc2, NULL, (char *)scratch + le_qgemm_scratch(M, K));
    nthreads = q_split(&jb[0], bytes, nthreads);
    int P = panels(m1->N);
    return le_run_units((P + jb[0].per_unit - 1) / jb[0].per_unit, qpair_unit, jb, nthreads, bytes * 8);
}
