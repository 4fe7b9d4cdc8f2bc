/* CPU-specific float32 kernels: fast activations, and LSTM/GRU layers run on the engine's own
 * GEMM/GEMV and fused gate loops over a small worker pool. Compiled for baseline x86-64 with
 * AVX2/FMA variants chosen at run time (never -march=native: a wheel must run on any x86-64).
 * Float64 never comes here: it keeps libm.
 */
#ifndef LSTM_ENGINE_CPU_H
#define LSTM_ENGINE_CPU_H

#include <stddef.h>

/* 1 when the AVX2+FMA variants run on this CPU, else 0 (the portable C variants). */
int le_simd_level(void);
/* Force the portable variants (level 0) or let dispatch choose (level -1); for tests. */
void le_set_simd_level(int level);

/* Elementwise, y may equal x. Max abs error vs libm: see _cpu.c. */
void le_tanh_f32(const float *x, float *y, ptrdiff_t n);
void le_sigmoid_f32(const float *x, float *y, ptrdiff_t n);

/* One direction of an LSTM (cell 0) or a GRU with reset after (cell 1) over B rows and T steps,
 * the hidden units split across threads. Each thread projects the inputs of its own units and
 * keeps the same rows of the weights every step, so its share stays in its own cache (DeepCPU's
 * weight-centric split); the threads meet once per step. */
typedef struct {
    int cell, B, In, H, T, reverse, zero_masked;
    const float *x;               /* (B, T, In) */
    const unsigned char *mask;    /* (B, T) valid steps, or NULL */
    float *y;                     /* output of (b, t) at y + b * y_row + t * y_step */
    ptrdiff_t y_row, y_step;
    float *h, *c;                 /* state (B, H), read and written; c unused for GRU */
    const float *w_ih, *w_hh, *bias, *bias_hn;
    float *work;                  /* B*T*G*H + B*G*H + 2*B*H floats */
} le_steps_args;

/* Runs on up to nthreads threads (the caller and pool workers); returns the number used. */
int le_run_steps_f32(le_steps_args *args, int nthreads);

/* The pool: workers are started on first use and reused; cpu count for the default. */
int le_cpu_count(void);

/* OpenBLAS thread counts (process-wide): bind once after the BLAS libraries are loaded; 0 when none
 * was found (another BLAS, or a platform without dl_iterate_phdr). */
int le_blas_bind(void);
int le_blas_threads(void);
void le_blas_set_threads(int n);

#endif
