/* Activation codes: the one list shared by C, Cython (_kernels.pxd declares the names) and Python
 * (activations.py reads the names and codes through _kernels.activation_codes()).
 * A code's position is its value; append new ones at the end so saved codes keep their meaning.
 * alpha and beta are used only by the general gate loop (_gates_general.c); the fast loops run the
 * codes below ACT_AFFINE with their fixed constants. */
#ifndef LSTM_ENGINE_ACTIVATIONS_H
#define LSTM_ENGINE_ACTIVATIONS_H

#define LE_ACTIVATIONS(X)                                                                   \
    X(ACT_SIGMOID, "sigmoid")                                                               \
    X(ACT_TANH, "tanh")                                                                     \
    X(ACT_RELU, "relu")                                                                     \
    X(ACT_LINEAR, "linear")                                                                 \
    X(ACT_HARD_SIGMOID, "hard_sigmoid")         /* clip(alpha x + beta, 0, 1); Keras 3: 1/6, 1/2 */ \
    X(ACT_HARD_SIGMOID_V2, "hard_sigmoid_v2")   /* the same with Keras 2's 0.2, 1/2 */      \
    X(ACT_SOFTSIGN, "softsign")                                                             \
    X(ACT_SOFTPLUS, "softplus")                                                             \
    X(ACT_ELU, "elu")                           /* x > 0 ? x : alpha (e^x - 1) */           \
    X(ACT_EXPONENTIAL, "exponential")                                                       \
    X(ACT_AFFINE, "affine")                     /* alpha x + beta */                        \
    X(ACT_LEAKY_RELU, "leaky_relu")             /* x >= 0 ? x : alpha x */                  \
    X(ACT_THRESHOLDED_RELU, "thresholded_relu") /* x > alpha ? x : 0 */                     \
    X(ACT_SCALED_TANH, "scaled_tanh")           /* alpha tanh(beta x) */

#define LE_ACTIVATION_ENUM(code, name) code,
enum { LE_ACTIVATIONS(LE_ACTIVATION_ENUM) ACT_COUNT };
#undef LE_ACTIVATION_ENUM

/* The name of code i (0 <= i < ACT_COUNT). */
static inline const char *le_activation_name(int code)
{
#define LE_ACTIVATION_NAME(code, name) name,
    static const char *const names[] = {LE_ACTIVATIONS(LE_ACTIVATION_NAME)};
#undef LE_ACTIVATION_NAME
    return names[code];
}

#endif
