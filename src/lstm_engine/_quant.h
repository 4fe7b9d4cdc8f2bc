/* Smaller weights: int8 (dynamic quantization) and float16/bfloat16 storage for the products of
 * recurrent layers and Dense heads (cpu_quant.c). The float32 gate loops stay as they are: these
 * products give them float32 sums.
 *
 * int8: weights symmetric per output row, w = q * scale[n], q in [-127, 127]; activations
 * quantized per row at every call, a = (u - 128) * sa with u in [1, 255] (u8 for vpdpbusd's
 * unsigned operand), so sum_k a_k w_k = sa * scale[n] * (sum_k u_k q_k - 128 * sum_k q_k). The
 * integer sums are exact in every variant (AVX2 widens both operands to 16 bits for vpmaddwd, so
 * vpmaddubsw's 16-bit saturation never arises): int8 results are bit-identical across variants.
 * float16/bfloat16: the weights are widened to float32 in the micro-kernel, sums in float32.
 */
#ifndef LSTM_ENGINE_QUANT_H
#define LSTM_ENGINE_QUANT_H

#include <stddef.h>
#include <stdint.h>

/* Weight kinds: one source of these codes, read by _kernels.pyx. */
enum { LE_W_INT8 = 1, LE_W_FLOAT16 = 2, LE_W_BFLOAT16 = 3 };

/* Product variants, best last. */
enum { LE_Q_PORTABLE = 0, LE_Q_AVX2 = 1, LE_Q_AVXVNNI = 2, LE_Q_AVX512 = 3, LE_Q_NUM_VARIANTS = 4 };

/* The longest row (K) a packed weight may have: a row chunk of quantized activations lives on the
 * stack (64 KiB), and 255 * 127 * K stays inside int32. Python refuses larger. */
enum { LE_Q_MAX_K = 65536 };

/* A weight (N, K) packed once in panels of 16 output rows. int8: per panel, K rounded up to 4 in
 * groups of 4, each group 16 rows x 4 bytes (vpdpbusd's lanes); float16/bfloat16: per panel, K rows
 * of 16 halves. scale and comp (int8 only) hold Np = N rounded up to 16 entries. */
typedef struct {
    int kind, N, K;
    const void *w;          /* 64-byte aligned */
    const float *scale;     /* int8: the row scales */
    const int32_t *comp;    /* int8: 128 * sum_k q[n, k] */
} le_qmat;

/* Bytes of packed weights. */
ptrdiff_t le_qmat_size(int kind, int N, int K);
/* src: int8 (N, K) for LE_W_INT8, else the uint16 bit patterns (N, K); comp: Np int32 (int8 only). */
void le_qmat_pack(int kind, const void *src, int N, int K, void *out, int32_t *comp);

/* C[M, N] = (accumulate ? C : 0) + A[M, K] . W^T (+ bias[N]), on up to nthreads threads (panels
 * split between them); rows of A and C at lda / ldc floats. scratch: le_qgemm_scratch(M, K) bytes
 * for int8's quantized rows (quantized once, before the threads start). Returns the threads used. */
int le_qgemm(const le_qmat *m, int M, const float *A, ptrdiff_t lda, float *C, ptrdiff_t ldc, int accumulate,
             const float *bias, int nthreads, void *scratch);
ptrdiff_t le_qgemm_scratch(int M, int K);
/* C1 = (acc1 ? C1 : 0) + A1 . W1^T, then C2 = (acc2 ? C2 : 0) + A2 . W2^T (C2 may be C1), M rows each, as one
 * job on the engine's threads when W1 and W2 have as many rows (a streamed step's input and recurrent
 * products: one wake-up and join instead of two); the same sums as two le_qgemm calls. scratch: twice
 * le_qgemm_scratch(M, the larger K). */
int le_qgemm_pair(const le_qmat *m1, const float *A1, ptrdiff_t lda1, float *C1, ptrdiff_t ldc1, int acc1,
                  const le_qmat *m2, const float *A2, ptrdiff_t lda2, float *C2, ptrdiff_t ldc2, int acc2,
                  int M, int nthreads, void *scratch);

/* Embedding rows ids[0..B) of a (V, E) table kept as `kind` (int8 with row scales, or the bits of float16 /
 * bfloat16), widened to float32 into out (B, E): the values lstm_engine.quantize's dequantization gives
 * (int8: (float)q * scale[id], one rounding). ids must be valid. */
void le_q_embed_rows(int kind, const void *table, const float *scale, int E, const ptrdiff_t *ids, int B, float *out);

/* The gates of one row of a quantized layer with sigmoid gates and tanh, on the float32 kernels' vectorised
 * activations (the general loop's libm tanhf/expf cost more than the int8 products save at large batches).
 * LSTM: q (4H) the products of i, f, g, o, overwritten; c (H) updated; h (H) written. GRU (reset after): q (3H)
 * the input products, overwritten, hq (3H) the recurrent ones, h (H) updated in place. */
void le_q_lstm_gates(int H, float *q, const float *bias, float *c, float *h);
void le_q_gru_gates(int H, float *q, const float *hq, const float *bias, const float *bias_hn, float *h);

/* The variant in use: the best the CPU has, capped by the float32 variant (LSTM_ENGINE_KERNELS=portable
 * gives portable products too), unless forced. */
int le_q_level(void);
int le_q_detected(void);
/* Force a variant (0..3; the CPU must have it) or -1 for dispatch; -1 returned when it cannot run. */
int le_q_set_level(int level);
int le_q_supported(int level);
const char *le_q_name(int level);
const char *le_q_reason(int level);

#endif
