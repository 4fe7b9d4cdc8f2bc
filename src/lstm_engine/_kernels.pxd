# Declarations shared by the kernels: fused float types, activation and cell codes.

ctypedef fused floating:
    float
    double

# Activation codes, defined once in _activations.h (Python reads them via activation_codes()).
cdef extern from "_activations.h":
    cdef enum:
        ACT_SIGMOID
        ACT_TANH
        ACT_RELU
        ACT_LINEAR
        ACT_HARD_SIGMOID          # clip(alpha x + beta, 0, 1); Keras 3: 1/6, 1/2
        ACT_HARD_SIGMOID_V2       # Keras 2: 0.2, 1/2
        ACT_SOFTSIGN
        ACT_SOFTPLUS
        ACT_ELU
        ACT_EXPONENTIAL
        ACT_AFFINE                # this one and the ones below: the general gate loop only
        ACT_LEAKY_RELU
        ACT_THRESHOLDED_RELU
        ACT_SCALED_TANH
        ACT_COUNT
    const char* le_activation_name(int code)

# Cell codes, defined once in _cells.h (Python reads them as _kernels.CELL_CODES).
cdef extern from "_cells.h":
    cdef enum:
        CELL_LSTM
        CELL_GRU                   # PyTorch / Keras reset_after=True: r applied after the recurrent product
        CELL_GRU_RESET_BEFORE      # Keras reset_after=False: r applied to h before the recurrent product
        CELL_RNN
