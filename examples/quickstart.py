"""Build a model from weights in PyTorch's layout and run it: no framework needed."""
import numpy as np

import lstm_engine as le

rng = np.random.default_rng(0)
I, H, B, T = 8, 16, 2, 5
lstm = le.LSTM(
    weight_ih=rng.standard_normal((4 * H, I)) * 0.1,  # rows: gates i, f, g, o
    weight_hh=rng.standard_normal((4 * H, H)) * 0.1,
    bias_ih=np.zeros(4 * H),
    bias_hh=np.zeros(4 * H),
)
model = le.Model([lstm, le.Dense(rng.standard_normal((3, H)), np.zeros(3), activation="softmax")])
x = rng.standard_normal((B, T, I)).astype(np.float32)
y, state = model.forward(x, lengths=[5, 3])
print("y:", y.shape, "h:", state[0][0].shape, "c:", state[0][1].shape)
print(y[0, -1])
