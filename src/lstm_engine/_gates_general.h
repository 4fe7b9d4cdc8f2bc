/* The general gate loops: per-direction activations with alpha/beta, gate clipping, LSTM peepholes
 * and coupled input/forget gates (the ONNX LSTM/GRU/RNN attributes). A layer that uses none of
 * these never comes here: its kernels keep their own fused loops (_kernels.pyx, cpu_products.c).
 *
 * One call computes one batch row of one step, after the recurrent products; the caller (the
 * per-direction loop in _kernels.pyx) owns the products, masks and outputs. Gate blocks are in the
 * engine's (PyTorch's) order: LSTM i, f, g, o; GRU r, z, n; biases as _recurrent.py sums them.
 */
#ifndef LSTM_ENGINE_GATES_GENERAL_H
#define LSTM_ENGINE_GATES_GENERAL_H

#include "_activations.h"

typedef struct {
    int code;            /* ACT_* */
    double alpha, beta;  /* used by the codes that take them, ignored by the others */
} le_activation;

typedef struct {
    le_activation gate;      /* the gates' function (i, f, o; r, z): recurrent_activation */
    le_activation act;       /* LSTM g, GRU n, RNN h: activation */
    le_activation cell_act;  /* LSTM: the function of the new cell in h = o * cell_act(c) */
    double clip;             /* > 0: every pre-activation is clamped to [-clip, clip]; 0: none */
    int input_forget;        /* LSTM: f = 1 - i (onnxruntime's coupling) */
    const void *peephole;    /* LSTM: (3, H) in the kernel's dtype, rows i, f, o; or NULL. The o row
                                sees the new cell (ONNX). */
} le_gate_options;

/* LSTM: q (4H) pre-activations without bias, bias (4H); c (H) read and written, h (H) written. */
void le_lstm_general_f32(const le_gate_options *o, int H, const float *q, const float *bias, float *c, float *h);
void le_lstm_general_f64(const le_gate_options *o, int H, const double *q, const double *bias, double *c,
                         double *h);

/* GRU, reset after the product: xq (3H) input part, hq (3H) recurrent products, bias (3H) with the
 * r and z biases summed, bias_hn (H); h (H) read and written. */
void le_gru_general_f32(const le_gate_options *o, int H, const float *xq, const float *hq, const float *bias,
                        const float *bias_hn, float *h);
void le_gru_general_f64(const le_gate_options *o, int H, const double *xq, const double *hq,
                        const double *bias, const double *bias_hn, double *h);

/* GRU, reset before the product, first half: r and z from xq, hq (their first 2H); z is stored in
 * hq[H:2H] and r * h in rh (H) for the caller's product R_n (r * h), which it writes to hq[2H:3H]. */
void le_gru_before_gates_f32(const le_gate_options *o, int H, const float *xq, float *hq, const float *bias,
                             const float *h, float *rh);
void le_gru_before_gates_f64(const le_gate_options *o, int H, const double *xq, double *hq,
                             const double *bias, const double *h, double *rh);
/* ... second half: n from xq[2H:], hq[2H:] and bias[2H:] (both biases summed), then h. */
void le_gru_before_output_f32(const le_gate_options *o, int H, const float *xq, const float *hq,
                              const float *bias, float *h);
void le_gru_before_output_f64(const le_gate_options *o, int H, const double *xq, const double *hq,
                              const double *bias, double *h);

/* RNN: h = act(clip(q + bias)); q (H) with both products, h (H) written. */
void le_rnn_general_f32(const le_gate_options *o, int H, const float *q, const float *bias, float *h);
void le_rnn_general_f64(const le_gate_options *o, int H, const double *q, const double *bias, double *h);

/* act(x) of one activation, for tests. */
double le_activate_f64(const le_activation *a, double x);

#endif
