# Declarations shared by the kernels: fused float types, activation and cell codes.

ctypedef fused floating:
    float
    double

# Activation codes; the Python side maps names to these (see _activations.py).
cdef enum:
    ACT_SIGMOID = 0
    ACT_TANH = 1
    ACT_RELU = 2
    ACT_LINEAR = 3
    ACT_HARD_SIGMOID = 4      # Keras 3: clip(x / 6 + 1/2, 0, 1)
    ACT_HARD_SIGMOID_V2 = 5   # Keras 2: clip(0.2 x + 1/2, 0, 1)
    ACT_SOFTSIGN = 6
    ACT_SOFTPLUS = 7
    ACT_ELU = 8
    ACT_EXPONENTIAL = 9

# Cell codes.
cdef enum:
    CELL_LSTM = 0
    CELL_GRU = 1               # PyTorch / Keras reset_after=True: r applied after the recurrent product
    CELL_GRU_RESET_BEFORE = 2  # Keras reset_after=False: r applied to h before the recurrent product
    CELL_RNN = 3
