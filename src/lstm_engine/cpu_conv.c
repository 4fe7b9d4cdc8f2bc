/* 1-D convolution of float32 rows (ONNX Conv on (N, C, L)): each output position's window is gathered
 * once into a column (zeros where the padding is, or mirrored for a folded reflect Pad), then every output
 * channel is a dot product of its weight row with the columns (portable), or, in the SIMD variants, panels of
 * 16 output channels sit in the lanes of registers, each column's value broadcast, the weight packed once
 * (le_conv1d_pack). A streamed chunk (silero-vad: 4 positions, 129..258 channels) is far too small for BLAS
 * to pay for its call, and one call here replaces NumPy's padding, window copy, GEMM, bias and Relu.
 * Variants as in cpu_products.c (portable, AVX2+FMA, AVX-512), chosen by le_simd_level(). */
#define _GNU_SOURCE
#include "_cpu_impl.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef LE_X86
#include <immintrin.h>
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#endif

/* cols[l * K + c * k + j] = x[c, l * stride + j * dilation - pad0]: 0 outside [0, L), or mirrored (reflect). */
static void gather_columns(int C, int L, int k, int stride, int dilation, int pad0, int reflect, int Lo,
                           const float *x, ptrdiff_t ldc, float *cols)
{
    int K = C * k;
    for (int l = 0; l < Lo; l++) {
        float *col = cols + (ptrdiff_t)l * K;
        int first = l * stride - pad0;
        for (int c = 0; c < C; c++) {
            const float *xc = x + c * ldc;
            float *dst = col + c * k;
            if (dilation == 1 && first >= 0 && first + k <= L) {
                /* A short window by a loop: a memcpy call per channel of 3 floats (the encoders' k) cost more
                 * than the copy, a third of a streamed chunk's first encoder Conv. */
                if (k <= 16)
                    for (int j = 0; j < k; j++)
                        dst[j] = xc[first + j];
                else
                    memcpy(dst, xc + first, k * sizeof(float));
                continue;
            }
            for (int j = 0; j < k; j++) {
                int pos = first + j * dilation;
                if (pos >= 0 && pos < L)
                    dst[j] = xc[pos];
                else if (reflect)
                    dst[j] = xc[pos < 0 ? -pos : 2 * (L - 1) - pos];
                else
                    dst[j] = 0.0f;
            }
        }
    }
}

INLINE float finish(float s, const float *b, int r, int relu)
{
    s = b ? s + b[r] : s;
    return relu && !(s > 0.0f) && s == s ? 0.0f : s; /* max(s, 0), NaN kept as NumPy's maximum keeps it */
}

/* -- portable ------------------------------------------------------------------------------ */

static void products_c(int M, int K, int Lo, const float *W, const float *Wp, const float *cols, const float *b,
                       int relu, float *y, ptrdiff_t ldy)
{
    (void)Wp;
    for (int r = 0; r < M; r++)
        for (int l = 0; l < Lo; l++)
            y[(ptrdiff_t)r * ldy + l] =
                finish(le_dot_c(W + (ptrdiff_t)r * K, cols + (ptrdiff_t)l * K, K), b, r, relu);
}

#ifdef LE_X86
/* The walk of both SIMD variants over the weight's panels, NP at a time, and the columns, NL at a time (NP, NL
 * set by the variant for its registers): TILE(np) runs one tile of np panels by nl columns. */
/* One call of a variant's panel_tile with literal panel and column counts, so each is a tile of its own. */
#define TILE_COLUMNS(TILE, NP)                                                                          \
    switch (nl) {                                                                                       \
    case 4: TILE(NP, 4, M, K, Wp, cols, b, relu, y, ldy, p, l); break;                                  \
    case 3: TILE(NP, 3, M, K, Wp, cols, b, relu, y, ldy, p, l); break;                                  \
    case 2: TILE(NP, 2, M, K, Wp, cols, b, relu, y, ldy, p, l); break;                                  \
    default: TILE(NP, 1, M, K, Wp, cols, b, relu, y, ldy, p, l); break;                                 \
    }

#define WALK_PANELS(TILE)                                                                               \
    int panels = (M + LE_CONV_PANEL - 1) / LE_CONV_PANEL;                                               \
    for (int p = 0; p < panels; p += NP) {                                                              \
        int np = panels - p < NP ? panels - p : NP;                                                     \
        for (int l = 0; l < Lo; l += NL) {                                                              \
            int nl = Lo - l < NL ? Lo - l : NL;                                                         \
            switch (np) {                                                                               \
            case 4: TILE_COLUMNS(TILE, 4) break;                                                        \
            case 3: TILE_COLUMNS(TILE, 3) break;                                                        \
            case 2: TILE_COLUMNS(TILE, 2) break;                                                        \
            default: TILE_COLUMNS(TILE, 1) break;                                                       \
            }                                                                                           \
        }                                                                                               \
    }

/* -- AVX2 + FMA: the AVX-512 products' panels (below) as two 8-lane halves, NP panels x NL columns (at most
 * 1 x 4, 2 x 2 or 4 x 1: 8 sums); the finish (bias, Relu) per output as the portable products do it. */

AVX2 INLINE void panel_tile_avx2(const int NP, const int NL, int M, int K, const float *Wp, const float *cols,
                                 const float *b, int relu, float *y, ptrdiff_t ldy, int p, int l)
{
    __m256 acc[4][2][4];
    for (int i = 0; i < NP; i++)
        for (int j = 0; j < NL; j++)
            acc[i][0][j] = acc[i][1][j] = _mm256_setzero_ps();
    const float *w = Wp + (ptrdiff_t)p * LE_CONV_PANEL * K, *v = cols + (ptrdiff_t)l * K;
    for (int kk = 0; kk < K; kk++) {
        for (int i = 0; i < NP; i++) {
            const float *wk = w + ((ptrdiff_t)i * K + kk) * LE_CONV_PANEL;
            __m256 lo = _mm256_loadu_ps(wk), hi = _mm256_loadu_ps(wk + 8);
            for (int j = 0; j < NL; j++) {
                __m256 x = _mm256_broadcast_ss(v + (ptrdiff_t)j * K + kk);
                acc[i][0][j] = _mm256_fmadd_ps(lo, x, acc[i][0][j]);
                acc[i][1][j] = _mm256_fmadd_ps(hi, x, acc[i][1][j]);
            }
        }
    }
    for (int i = 0; i < NP; i++) {
        int r = (p + i) * LE_CONV_PANEL, rows = M - r < LE_CONV_PANEL ? M - r : LE_CONV_PANEL;
        for (int j = 0; j < NL; j++) {
            float out[LE_CONV_PANEL];
            _mm256_storeu_ps(out, acc[i][0][j]);
            _mm256_storeu_ps(out + 8, acc[i][1][j]);
            for (int q = 0; q < rows; q++)
                y[(ptrdiff_t)(r + q) * ldy + l + j] = finish(out[q], b, r + q, relu);
        }
    }
}

AVX2 static void products_avx2(int M, int K, int Lo, const float *W, const float *Wp, const float *cols,
                               const float *b, int relu, float *y, ptrdiff_t ldy)
{
    (void)W;
    int NL = Lo >= 4 ? 4 : Lo, NP = NL >= 3 ? 1 : NL == 2 ? 2 : 4;
    WALK_PANELS(panel_tile_avx2)
}

/* -- AVX-512: output channels in the lanes, NP panels of 16 x NL columns (at most 4 x 2 or 2 x 4: 8 sums) --
 * The weight comes packed in panels (le_conv1d_pack): one load gives 16 channels' weights at one position of the
 * window, each column's value is broadcast, and every sum stays in its lane: no horizontal reduction per output
 * (which was a third of the instructions of a 4 x 4 tile of row dot products), bias and Relu on 16 at once. */

AVX512 INLINE void panel_tile_avx512(const int NP, const int NL, int M, int K, const float *Wp, const float *cols,
                                     const float *b, int relu, float *y, ptrdiff_t ldy, int p, int l)
{
    __m512 acc[4][4];
    for (int i = 0; i < NP; i++)
        for (int j = 0; j < NL; j++)
            acc[i][j] = _mm512_setzero_ps();
    const float *w = Wp + (ptrdiff_t)p * LE_CONV_PANEL * K, *v = cols + (ptrdiff_t)l * K;
    for (int kk = 0; kk < K; kk++) {
        __m512 wv[4];
        for (int i = 0; i < NP; i++)
            wv[i] = _mm512_loadu_ps(w + ((ptrdiff_t)i * K + kk) * LE_CONV_PANEL);
        for (int j = 0; j < NL; j++) {
            __m512 x = _mm512_set1_ps(v[(ptrdiff_t)j * K + kk]);
            for (int i = 0; i < NP; i++)
                acc[i][j] = _mm512_fmadd_ps(wv[i], x, acc[i][j]);
        }
    }
    for (int i = 0; i < NP; i++) {
        int r = (p + i) * LE_CONV_PANEL, rows = M - r < LE_CONV_PANEL ? M - r : LE_CONV_PANEL;
        __mmask16 m = (__mmask16)((1u << rows) - 1);
        __m512 bias = b ? _mm512_maskz_loadu_ps(m, b + r) : _mm512_setzero_ps();
        for (int j = 0; j < NL; j++) {
            float out[LE_CONV_PANEL];
            __m512 s = b ? _mm512_add_ps(acc[i][j], bias) : acc[i][j];
            if (relu) /* as finish: kept where s > 0 or NaN (not <= 0), else 0 */
                s = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_NLE_UQ), s);
            _mm512_storeu_ps(out, s);
            for (int q = 0; q < rows; q++)
                y[(ptrdiff_t)(r + q) * ldy + l + j] = out[q];
        }
    }
}

AVX512 static void products_avx512(int M, int K, int Lo, const float *W, const float *Wp, const float *cols,
                                   const float *b, int relu, float *y, ptrdiff_t ldy)
{
    (void)W;
    /* Four columns at a time with two panels, fewer columns with four panels: eight sums in flight. */
    int NL = Lo >= 4 ? 4 : Lo, NP = NL >= 3 ? 2 : 4;
    WALK_PANELS(panel_tile_avx512)
}
#endif

ptrdiff_t le_conv1d_packed_size(int M, int K)
{
    return (ptrdiff_t)((M + LE_CONV_PANEL - 1) / LE_CONV_PANEL) * LE_CONV_PANEL * K;
}

void le_conv1d_pack(int M, int K, const float *W, float *Wp)
{
    for (int r0 = 0; r0 < M; r0 += LE_CONV_PANEL)
        for (int kk = 0; kk < K; kk++)
            for (int q = 0; q < LE_CONV_PANEL; q++)
                *Wp++ = r0 + q < M ? W[(ptrdiff_t)(r0 + q) * K + kk] : 0.0f;
}

int le_conv1d_f32(const le_conv1d_args *a)
{
    int K = a->C * a->k;
    void (*products)(int, int, int, const float *, const float *, const float *, const float *, int, float *,
                     ptrdiff_t) = products_c;
#ifdef LE_X86
    int level = le_simd_level();
    if (level >= LE_AVX512)
        products = products_avx512;
    else if (level >= LE_AVX2)
        products = products_avx2;
#endif
    float *cols = a->cols ? a->cols : malloc((size_t)a->Lo * K * sizeof(float) + 1);
    if (!cols)
        return -1;
    for (int n = 0; n < a->N; n++) {
        gather_columns(a->C, a->L, a->k, a->stride, a->dilation, a->pad0, a->reflect, a->Lo, a->x + n * a->x_n,
                       a->x_c, cols);
        products(a->M, K, a->Lo, a->W, a->Wp, cols, a->b, a->relu, a->y + n * a->y_n, a->y_m);
    }
    if (cols != a->cols)
        free(cols);
    return 0;
}

/* The magnitude of an STFT's halves, which follow its Conv: out[i] = sqrt(a[i]^2 + b[i]^2), each square, the sum
 * and the root rounded once (as NumPy's power(x, 2), add and sqrt): no fused multiply-add. x86-64's baseline SSE
 * does four at a time (the compiler left the loop scalar: sqrtf may set errno). */
void le_magnitude_f32(ptrdiff_t n, const float *a, const float *b, float *out)
{
    ptrdiff_t i = 0;
#ifdef LE_X86
    for (; i + 4 <= n; i += 4) {
        __m128 x = _mm_loadu_ps(a + i), y = _mm_loadu_ps(b + i);
        _mm_storeu_ps(out + i, _mm_sqrt_ps(_mm_add_ps(_mm_mul_ps(x, x), _mm_mul_ps(y, y))));
    }
#endif
    for (; i < n; i++) {
        float sa = a[i] * a[i], sb = b[i] * b[i];
        out[i] = sqrtf(sa + sb);
    }
}
