/* Cell codes: the one definition shared by C (le_steps_args.cell in _cpu.h), Cython (_kernels.pxd declares
 * the names) and Python (lstm.py, gru.py, rnn.py read them as _kernels.CELL_CODES). */
#ifndef LSTM_ENGINE_CELLS_H
#define LSTM_ENGINE_CELLS_H

enum {
    CELL_LSTM = 0,
    CELL_GRU = 1,              /* PyTorch / Keras reset_after=True: r applied after the recurrent product */
    CELL_GRU_RESET_BEFORE = 2, /* Keras reset_after=False: r applied to h before the recurrent product */
    CELL_RNN = 3
};

#endif
