/* CPU-specific float32 kernels: fast activations, and LSTM/GRU layers run on the engine's own
 * packed-weight GEMM/GEMV with the gates applied to each block while it is in registers, over a
 * small worker pool. Compiled for baseline x86-64 with AVX2/FMA and AVX-512 variants chosen at run
 * time (never -march=native: a wheel must run on any x86-64). Float64 never comes here: it keeps
 * libm and BLAS.
 *
 * The C files, one per concern: cpu_detect.c (which variant runs, how many cores we may use),
 * cpu_products.c (activations, micro-kernels and gate epilogues, once per variant), cpu_steps.c
 * (weight packing and a layer's steps over the threads), cpu_pool.c (the worker pool),
 * cpu_blas.c (OpenBLAS thread counts). _cpu_impl.h holds what they share inside.
 */
#ifndef LSTM_ENGINE_CPU_H
#define LSTM_ENGINE_CPU_H

#include <stddef.h>

#include "_cells.h"

/* Kernel variants, best last. The one source of these codes: _kernels.pyx reads them from here. */
enum { LE_PORTABLE = 0, LE_AVX2 = 1, LE_AVX512 = 2, LE_NUM_VARIANTS = 3 };

/* Hidden units per packed panel (every variant uses the same layout; see cpu_steps.c). */
enum { LE_PANEL = 16 };

/* The variant in use: the best the CPU supports, unless forced. */
int le_simd_level(void);
/* The best variant this CPU and OS support. */
int le_simd_detected(void);
/* The forced variant, or -1 when dispatch chooses. */
int le_simd_forced(void);
/* Force a variant (0..2; must be supported) or let dispatch choose (-1). Returns 0, or -1 when the
 * CPU lacks the variant's instructions (nothing changes then). */
int le_set_simd_level(int level);
/* Why a variant can or cannot run here: a short sentence (static storage). */
const char *le_simd_reason(int level);
const char *le_simd_name(int level);

/* Elementwise, y may equal x. Max abs error vs libm: see cpu_products.c. */
void le_tanh_f32(const float *x, float *y, ptrdiff_t n);
void le_sigmoid_f32(const float *x, float *y, ptrdiff_t n);

/* Packed layouts, built once at load. Weights W (G*H, K) in gate blocks (PyTorch's row layout) become
 * ceil(H/16) panels of K rows of G*16 floats: panel p, row k holds W[g*H + 16p + u, k] for each gate g
 * and unit u (zeros past H). le_packed_size gives the floats needed. */
ptrdiff_t le_packed_size(int G, int H, int K);
void le_pack_f32(const float *W, int G, int H, int K, float *out);
/* A (G*H) vector in the same gate-by-panel order, zero padded: G*Hp floats (Hp = H rounded up to 16). */
void le_pack_bias_f32(const float *b, int G, int H, float *out);

/* One direction of an LSTM (cell CELL_LSTM) or a GRU with reset after (CELL_GRU) over B rows and T steps. */
typedef struct {
    int cell, B, In, H, T, reverse, zero_masked;
    const float *x;               /* (B, T, In) */
    const unsigned char *mask;    /* (B, T) valid steps, or NULL */
    float *y;                     /* output of (b, t) at y + b * y_row + t * y_step */
    ptrdiff_t y_row, y_step;
    float *h, *c;                 /* state (B, H), read and written; c unused for GRU */
    const float *w_ih, *w_hh;     /* packed (le_pack_f32), 64-byte aligned */
    const float *bias;            /* packed (le_pack_bias_f32): b_ih + b_hh, GRU's n gate b_in only */
    const float *bias_hn;         /* GRU: b_hn zero padded to Hp, else NULL */
    float *work;                  /* le_steps_work_size floats */
    /* Optional, NULL when unused. table: the input projection of every token id computed ahead
     * (le_project_f32 of an embedding: V rows of G * Hp floats, bias included); x is then unused
     * and ids (B, T) pick each step's row. lengths: per row its number of valid steps, the rows
     * sorted longest first, so that step t runs only the rows still going (a prefix); the others
     * keep their state and output zeros, as padded steps of a packed sequence. y_rows: the output
     * row of each row (rows sorted for lengths, outputs left in the caller's order). */
    const float *table;
    const ptrdiff_t *ids;
    const int *lengths;
    const int *y_rows;
} le_steps_args;

ptrdiff_t le_steps_work_size(int cell, int B, int H, int T);

/* out row r (G * Hp floats, packed order) = W_ih . x row r + bias: the input projection the steps
 * compute, done ahead for every row of x (an embedding's table), on this thread. */
void le_project_f32(int cell, int H, int In, const float *x, int rows, const float *w_ih, const float *bias,
                    float *out);

/* Runs on up to nthreads threads (the caller and pool workers); returns the number used. */
int le_run_steps_f32(le_steps_args *args, int nthreads);

/* Layers of a chain, the most le_run_chain_f32 takes at once (and a session's ChainStep at all). */
enum { LE_CHAIN_MAX = 8 };
/* n layers in turn, layer l + 1 reading layer l's output (its x is layer l's y), as le_run_steps_f32 would run
 * each on up to nthreads[l] threads, in one pool job; returns the threads used. */
int le_run_chain_f32(le_steps_args *layers, const int *nthreads, int n);

/* Cores this process may use: its affinity mask, a cgroup CPU quota and OMP_NUM_THREADS, the
 * smallest; le_cpu_count_reason says which set it. */
int le_cpu_count(void);
const char *le_cpu_count_reason(void);
/* Cores the calling thread may run on now: its affinity mask and the cgroup's CPU quota (no
 * OMP_NUM_THREADS, which sets a model's threads once); the pool reads it again while it runs. */
int le_usable_cores(void);

/* What the pool did with the jobs that asked for more than one thread (cpu_pool.c), counted since
 * the process began: le_pool_stats fills LE_POOL_NSTATS counters in this order, then the cores
 * the pool saw last and whether it holds the machine for contended now. */
enum { LE_POOL_ASKED, LE_POOL_SPLIT, LE_POOL_ONE_CORE, LE_POOL_STALLED, LE_POOL_CONTENDED, LE_POOL_BUSY,
       LE_POOL_AWAY, LE_POOL_NSTATS };
void le_pool_stats(long out[LE_POOL_NSTATS], int *cores, int *contended);
/* For tests: a sample of the other processes' use injected (cpu_pool.c says how). */
int le_pool_contention(long until, double others, int cores, int *left);
/* For tests: workers wait ns before joining each job (0: at once), as a worker without a core would. */
void le_pool_set_join_delay(long ns);

/* OpenBLAS thread counts (process-wide): bind once after the BLAS libraries are loaded; 0 when none
 * was found (another BLAS, or a platform without dl_iterate_phdr). */
int le_blas_bind(void);
int le_blas_threads(void);
void le_blas_set_threads(int n);

/* y[N] = W[N, K] . x[K] + b (row-major W, b may be NULL) with the best variant: the Dense head of a
 * one-row step (cpu_steps.c). On up to nthreads of the engine's threads (rows split between them, each
 * thread the same rows at every call; one thread under contention, as the steps), never through a BLAS
 * call's threads, which wait for a core on a busy machine. Results do not depend on the threads used;
 * returns that number. */
int le_gemv_f32(int N, int K, const float *W, ptrdiff_t ldw, const float *x, const float *b, float *y, int nthreads);

/* ONNX Conv, 1-D, of float32 rows (cpu_conv.c), one group: y[n, m, l] = b[m] + sum over c, j of
 * W[m, c * k + j] * x[n, c, l * stride + j * dilation - pad0], then max(y, 0) if relu. Outside [0, L) the input
 * is 0 (the Conv's own pads), or with reflect, mirrored as an ONNX reflect Pad of pad0 on the left makes it
 * (x[-p] = x[p], x[L - 1 + p] = x[L - 1 - p]: the Pad folded into the gather; the caller checks both widths are
 * below L). x and y run with unit stride along L and Lo, x_n/x_c and y_n/y_m are element strides; W is
 * (M, C * k) row-major (the portable products read it), Wp the same packed by le_conv1d_pack (the AVX2 and AVX-512
 * products read it), b NULL or (M,); cols is Lo * C * k floats of scratch, or NULL: allocated here. Returns 0, or
 * -1 when that allocation fails. */
typedef struct {
    int N, C, L, M, k, stride, dilation, pad0, Lo, relu, reflect;
    const float *x;
    ptrdiff_t x_n, x_c;
    const float *W, *Wp, *b;
    float *y;
    ptrdiff_t y_n, y_m;
    float *cols;
} le_conv1d_args;

int le_conv1d_f32(const le_conv1d_args *args);

/* A Conv weight (M, K) row-major packed in panels of LE_CONV_PANEL rows (zeros past M), each panel K vectors of
 * LE_CONV_PANEL: Wp[(r / P * K + kk) * P + r % P] = W[r, kk]; le_conv1d_packed_size(M, K) floats. */
#define LE_CONV_PANEL 16
ptrdiff_t le_conv1d_packed_size(int M, int K);
void le_conv1d_pack(int M, int K, const float *W, float *Wp);

/* out[i] = sqrt(a[i]^2 + b[i]^2), each operation rounded once (cpu_conv.c: an STFT's magnitude). */
void le_magnitude_f32(ptrdiff_t n, const float *a, const float *b, float *out);

#endif
