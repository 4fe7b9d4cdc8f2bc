"""lstm_engine: run LSTM, GRU and RNN models exported from PyTorch or Keras on the CPU, fast.

    import lstm_engine as le
    model = le.from_torch(torch_lstm_or_state_dict)
    y, state = model.forward(x)          # x (batch, steps, features)
    model = le.from_torch(net, example_x)  # any nn.Module: its forward, read with torch.export
"""
from . import activations
from ._kernels import cpu_info
from .errors import LoadError, UnsafeModelError, UnsupportedOpError
from .formats import load, load_state_dict
from .formats.keras import from_keras
from .formats.native import save
from .formats.torch import from_torch
from .graph import Graph, Node, ValueInfo
from .gru import GRU
from .layers import Activation, BatchNorm, Dense, Dropout, Embedding, LayerNorm, Masking
from .lstm import LSTM
from .model import Model
from .pool import Stream, StreamPool
from .quantize import quantize
from .rnn import RNN
from .session import Session

__version__ = "0.1.0"

__all__ = [
    "Activation",
    "BatchNorm",
    "Dense",
    "Dropout",
    "Embedding",
    "GRU",
    "Graph",
    "LSTM",
    "LayerNorm",
    "LoadError",
    "Masking",
    "Model",
    "Node",
    "RNN",
    "Session",
    "Stream",
    "StreamPool",
    "UnsafeModelError",
    "UnsupportedOpError",
    "ValueInfo",
    "cpu_info",
    "from_keras",
    "from_torch",
    "load",
    "load_state_dict",
    "quantize",
    "save",
]
