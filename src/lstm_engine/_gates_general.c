/* The general gate loops; see _gates_general.h. Written once as a macro over the float type and
 * its libm functions, expanded for float and double below. The activation switch runs per
 * element: this path serves models whose options the fast loops do not have, and keeps them simple. */
#include "_gates_general.h"

#include <math.h>

#define GENERAL_GATES(T, SFX, EXP, EXPM1, LOG1P, TANH)                                             \
    static inline T activate_##SFX(const le_activation *a, T x)                                    \
    {                                                                                              \
        T alpha = (T)a->alpha, beta = (T)a->beta;                                                  \
        switch (a->code) {                                                                         \
        case ACT_SIGMOID:                                                                          \
            return 1 / (1 + EXP(-x)); /* EXP overflows to inf for very negative x: exactly 0 */    \
        case ACT_TANH:                                                                             \
            return TANH(x);                                                                        \
        case ACT_RELU:                                                                             \
            return x < 0 ? 0 : x; /* NaN stays NaN */                                              \
        case ACT_LINEAR:                                                                           \
            return x;                                                                              \
        case ACT_HARD_SIGMOID:                                                                     \
        case ACT_HARD_SIGMOID_V2: {                                                                \
            T y = alpha * x + beta;                                                                \
            return y < 0 ? 0 : (y > 1 ? 1 : y);                                                    \
        }                                                                                          \
        case ACT_SOFTSIGN:                                                                         \
            return x / (1 + (x > 0 ? x : -x));                                                     \
        case ACT_SOFTPLUS: /* log(1 + e^x) without overflow */                                     \
            return x > 0 ? x + LOG1P(EXP(-x)) : LOG1P(EXP(x));                                     \
        case ACT_ELU:                                                                              \
            return x > 0 ? x : alpha * EXPM1(x);                                                   \
        case ACT_EXPONENTIAL:                                                                      \
            return EXP(x);                                                                         \
        case ACT_AFFINE:                                                                           \
            return alpha * x + beta;                                                               \
        case ACT_LEAKY_RELU:                                                                       \
            return x >= 0 ? x : alpha * x;                                                         \
        case ACT_THRESHOLDED_RELU:                                                                 \
            return x > alpha ? x : (x <= alpha ? 0 : x); /* NaN stays NaN */                       \
        default: /* ACT_SCALED_TANH */                                                             \
            return alpha * TANH(beta * x);                                                         \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    static inline T clip_##SFX(T x, T b)                                                           \
    {                                                                                              \
        return b > 0 ? (x > b ? b : (x < -b ? -b : x)) : x;                                        \
    }                                                                                              \
                                                                                                   \
    void le_lstm_general_##SFX(const le_gate_options *o, int H, const T *q, const T *bias, T *c, T *h) \
    {                                                                                              \
        const T *p = (const T *)o->peephole;                                                       \
        T b = (T)o->clip;                                                                          \
        for (int j = 0; j < H; j++) {                                                              \
            T cp = c[j];                                                                           \
            T ai = q[j] + bias[j], af = q[H + j] + bias[H + j];                                    \
            T ag = q[2 * H + j] + bias[2 * H + j], ao = q[3 * H + j] + bias[3 * H + j];            \
            if (p) {                                                                               \
                ai += p[j] * cp;                                                                   \
                af += p[H + j] * cp;                                                               \
            }                                                                                      \
            T i = activate_##SFX(&o->gate, clip_##SFX(ai, b));                                     \
            T f = o->input_forget ? 1 - i : activate_##SFX(&o->gate, clip_##SFX(af, b));           \
            T g = activate_##SFX(&o->act, clip_##SFX(ag, b));                                      \
            T cc = f * cp + i * g;                                                                 \
            if (p)                                                                                 \
                ao += p[2 * H + j] * cc;                                                           \
            T og = activate_##SFX(&o->gate, clip_##SFX(ao, b));                                    \
            c[j] = cc;                                                                             \
            h[j] = og * activate_##SFX(&o->cell_act, cc);                                          \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    void le_gru_general_##SFX(const le_gate_options *o, int H, const T *xq, const T *hq, const T *bias, \
                              const T *bias_hn, T *h)                                              \
    {                                                                                              \
        T b = (T)o->clip;                                                                          \
        for (int j = 0; j < H; j++) {                                                              \
            T r = activate_##SFX(&o->gate, clip_##SFX(xq[j] + hq[j] + bias[j], b));                \
            T z = activate_##SFX(&o->gate, clip_##SFX(xq[H + j] + hq[H + j] + bias[H + j], b));    \
            T an = xq[2 * H + j] + bias[2 * H + j] + r * (hq[2 * H + j] + bias_hn[j]);             \
            T n = activate_##SFX(&o->act, clip_##SFX(an, b));                                      \
            h[j] = (1 - z) * n + z * h[j];                                                         \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    void le_gru_before_gates_##SFX(const le_gate_options *o, int H, const T *xq, T *hq, const T *bias, \
                                   const T *h, T *rh)                                              \
    {                                                                                              \
        T b = (T)o->clip;                                                                          \
        for (int j = 0; j < H; j++) {                                                              \
            T r = activate_##SFX(&o->gate, clip_##SFX(xq[j] + hq[j] + bias[j], b));                \
            hq[H + j] = activate_##SFX(&o->gate, clip_##SFX(xq[H + j] + hq[H + j] + bias[H + j], b)); \
            rh[j] = r * h[j];                                                                      \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    void le_gru_before_output_##SFX(const le_gate_options *o, int H, const T *xq, const T *hq,      \
                                    const T *bias, T *h)                                           \
    {                                                                                              \
        T b = (T)o->clip;                                                                          \
        for (int j = 0; j < H; j++) {                                                              \
            T n = activate_##SFX(&o->act, clip_##SFX(xq[2 * H + j] + bias[2 * H + j] + hq[2 * H + j], b)); \
            T z = hq[H + j];                                                                       \
            h[j] = (1 - z) * n + z * h[j];                                                         \
        }                                                                                          \
    }                                                                                              \
                                                                                                   \
    void le_rnn_general_##SFX(const le_gate_options *o, int H, const T *q, const T *bias, T *h)    \
    {                                                                                              \
        T b = (T)o->clip;                                                                          \
        for (int j = 0; j < H; j++)                                                                \
            h[j] = activate_##SFX(&o->act, clip_##SFX(q[j] + bias[j], b));                         \
    }

GENERAL_GATES(float, f32, expf, expm1f, log1pf, tanhf)
GENERAL_GATES(double, f64, exp, expm1, log1p, tanh)

double le_activate_f64(const le_activation *a, double x) { return activate_f64(a, x); }
