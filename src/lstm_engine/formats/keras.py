"""Keras: model files (``.keras``, legacy ``.h5``, ``.weights.h5`` + config) and live models to engine layers.

Keras stores ``kernel`` (in, gates*units) and ``recurrent_kernel`` (units, gates*units), transposed with
respect to PyTorch, with gate blocks LSTM i,f,c,o (PyTorch's i,f,g,o) and GRU z,r,h (PyTorch's r,z,n).
Everything is re-laid out here once, into the engine's PyTorch layout.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from .. import activations
from ..errors import LoadError
from ..gru import GRU
from ..layers import Activation, BatchNorm, Dense, Dropout, Embedding, LayerNorm, Masking
from ..lstm import LSTM
from ..model import Model
from ..rnn import RNN
from ._keras_file import KerasLayerSpec, KerasModelSpec, read_keras

_DROPOUTS = {"Dropout", "SpatialDropout1D", "GaussianNoise", "GaussianDropout", "AlphaDropout",
             "ActivityRegularization"}


def _keras2(spec: KerasModelSpec) -> bool:
    """Whether the file came from Keras 1/2 (tf.keras), whose hard_sigmoid is 0.2x + 0.5."""
    version = spec.keras_version or ""
    return bool(version) and version.split(".")[0] in ("1", "2")


def _activation(value: Any, spec: KerasModelSpec, where: str) -> str:
    """The engine's name of a Keras activation config value (a name or a serialised function)."""
    if isinstance(value, dict):  # Keras 3 may serialise {"class_name": "function", "config": "tanh", ...}
        value = value.get("config", value.get("class_name"))
        if isinstance(value, dict):
            value = value.get("name")
    if value == "hard_sigmoid" and _keras2(spec):
        value = "hard_sigmoid_v2"
    try:
        return "softmax" if value == "softmax" else activations.canonical(value)
    except ValueError as exc:
        raise LoadError(f"{where}: {exc}") from exc


def _gru_rows(a: np.ndarray, units: int) -> np.ndarray:
    """Keras GRU blocks z, r, h along the last axis -> PyTorch's r, z, n."""
    z, r, h = (a[..., k * units:(k + 1) * units] for k in range(3))
    return np.concatenate([r, z, h], axis=-1)


def _recurrent_weights(class_name: str, cfg: dict, w: dict[str, np.ndarray], where: str) -> dict:
    """One direction's PyTorch-layout arguments from Keras kernel/recurrent_kernel/bias."""
    try:
        kernel, rec = w["kernel"], w["recurrent_kernel"]
    except KeyError as exc:
        raise LoadError(f"{where}: missing tensor {exc.args[0]!r}") from exc
    bias = w.get("bias")
    units = rec.shape[0]
    out: dict[str, Any] = {}
    if class_name == "GRU":
        reset_after = bool(cfg.get("reset_after", True))
        out["weight_ih"] = _gru_rows(kernel, units).T
        out["weight_hh"] = _gru_rows(rec, units).T
        if bias is not None:
            if reset_after:
                if bias.shape != (2, 3 * units):
                    raise LoadError(f"{where}: tensor 'bias': expected shape (2, {3 * units}) with "
                                    f"reset_after=True, found {bias.shape}")
                out["bias_ih"], out["bias_hh"] = _gru_rows(bias[0], units), _gru_rows(bias[1], units)
            else:
                out["bias_ih"] = _gru_rows(bias, units)
    else:  # LSTM's i,f,c,o is already PyTorch's i,f,g,o; SimpleRNN has one block
        out["weight_ih"], out["weight_hh"] = kernel.T, rec.T
        if bias is not None:
            out["bias_ih"] = bias
    return out


def _recurrent_layer(spec: KerasModelSpec, layer: KerasLayerSpec, dtype: Any, where: str):
    cfg = layer.config
    name = layer.class_name
    bidirectional = name == "Bidirectional"
    inner = cfg["layer"] if bidirectional else {"class_name": name, "config": cfg}
    inner_cls, inner_cfg = inner["class_name"], inner["config"]
    if inner_cls not in ("LSTM", "GRU", "SimpleRNN"):
        raise LoadError(f"{where}: Bidirectional around {inner_cls} is not supported")
    if inner_cfg.get("time_major"):
        raise LoadError(f"{where}: time_major=True is not supported")
    options: dict[str, Any] = {"dtype": dtype}
    act = _activation(inner_cfg.get("activation", "tanh"), spec, where)
    if inner_cls == "SimpleRNN":
        options["nonlinearity"] = act
    else:
        options["activation"] = act
        options["recurrent_activation"] = _activation(inner_cfg.get("recurrent_activation", "sigmoid"),
                                                      spec, where)
    if inner_cls == "GRU":
        options["reset_after"] = bool(inner_cfg.get("reset_after", True))
    if bidirectional:
        merge = cfg.get("merge_mode", "concat")
        if merge is None:
            raise LoadError(f"{where}: Bidirectional with merge_mode=None (two outputs) is not supported")
        backward_cfg = cfg.get("backward_layer", {}).get("config", inner_cfg)
        for key in ("units", "activation", "recurrent_activation", "reset_after", "use_bias"):
            if backward_cfg.get(key, inner_cfg.get(key)) != inner_cfg.get(key):
                raise LoadError(f"{where}: forward and backward layers differ in {key!r}")
        fw = _recurrent_weights(inner_cls, inner_cfg, {k[8:]: v for k, v in layer.weights.items()
                                                       if k.startswith("forward/")}, where + " forward")
        bw = _recurrent_weights(inner_cls, inner_cfg, {k[9:]: v for k, v in layer.weights.items()
                                                       if k.startswith("backward/")}, where + " backward")
        args = {k: np.stack([fw[k], bw[k]]) for k in fw}
        return_sequences = bool(inner_cfg.get("return_sequences", False))
        options.update(merge_mode=merge, return_sequences=return_sequences,
                       # Keras's Bidirectional zeroes masked outputs exactly when it returns sequences.
                       zero_output_for_mask=return_sequences)
    else:
        args = _recurrent_weights(inner_cls, inner_cfg, layer.weights, where)
        options.update(go_backwards=bool(cfg.get("go_backwards", False)),
                       return_sequences=bool(cfg.get("return_sequences", False)),
                       zero_output_for_mask=bool(cfg.get("zero_output_for_mask", False)))
    cls = {"LSTM": LSTM, "GRU": GRU, "SimpleRNN": RNN}[inner_cls]
    return cls(**args, **options)


def _layer(spec: KerasModelSpec, layer: KerasLayerSpec, dtype: Any, where: str):
    """The engine layer for one Keras layer, or None for layers that do nothing at inference."""
    name, cfg, w = layer.class_name, layer.config, layer.weights
    if name in ("LSTM", "GRU", "SimpleRNN", "Bidirectional"):
        return _recurrent_layer(spec, layer, dtype, where)
    if name == "InputLayer":
        return None
    if name in _DROPOUTS:
        return Dropout()
    if name == "Activation":
        return Activation(_activation(cfg.get("activation"), spec, where))
    if name == "Masking":
        return Masking(cfg.get("mask_value", 0.0))
    if name == "Embedding":
        return Embedding(w["embeddings"], mask_zero=bool(cfg.get("mask_zero", False)), dtype=dtype)
    if name == "TimeDistributed":
        inner = cfg["layer"]
        if inner["class_name"] != "Dense":
            raise LoadError(f"{where}: TimeDistributed({inner['class_name']}) is not supported, only Dense")
        cfg = inner["config"]
        name = "Dense"
    if name == "Dense":
        return Dense(w["kernel"].T, w.get("bias"), activation=_activation(cfg.get("activation"), spec, where),
                     dtype=dtype)
    if name == "LayerNormalization":
        axis = cfg.get("axis", -1)
        if axis not in (-1, [-1]) and not (isinstance(axis, list) and len(axis) == 1 and axis[0] == 2):
            raise LoadError(f"{where}: LayerNormalization over axis {axis} is not supported, only the last axis")
        if cfg.get("rms_scaling"):
            raise LoadError(f"{where}: LayerNormalization(rms_scaling=True) is not supported")
        return LayerNorm(w.get("gamma"), w.get("beta"), eps=cfg.get("epsilon", 1e-3), dtype=dtype)
    if name == "BatchNormalization":
        axis = cfg.get("axis", -1)
        if axis not in (-1, 2, [-1], [2]):
            raise LoadError(f"{where}: BatchNormalization over axis {axis} is not supported, only the last axis")
        return BatchNorm(w["moving_mean"], w["moving_variance"], w.get("gamma"), w.get("beta"),
                         eps=cfg.get("epsilon", 1e-3), dtype=dtype)
    raise LoadError(f"{where}: Keras layer class {name!r} is not supported")


def _mask_is_propagated(spec: KerasModelSpec, index: int) -> bool:
    """Whether layer ``index``'s explicit mask= equals the mask the chain carries to it anyway.

    Keras 3 functional configs spell out the mask a Masking layer or Embedding(mask_zero=True) makes
    as op layers on their input; that is the mask the engine's Masking/Embedding layers propagate.
    """
    mask = spec.layers[index].explicit_mask
    names = [layer.name for layer in spec.layers]
    if mask.source not in names[:index]:
        return False
    start = names.index(mask.source)
    for k in range(index - 1, start - 1, -1):
        layer = spec.layers[k]
        if layer.class_name == "Masking":
            return (mask.reduce_last_axis and mask.value == layer.config.get("mask_value", 0.0)
                    and k - start <= 1)
        if layer.class_name == "Embedding" and layer.config.get("mask_zero"):
            return not mask.reduce_last_axis and mask.value == 0 and k - start <= 1
    return False


def model_from_spec(spec: KerasModelSpec, path: str, dtype: Any = None) -> Model:
    """A Model from a KerasModelSpec read from ``path``."""
    dtype = np.float32 if dtype is None else dtype
    built = []
    for index, layer in enumerate(spec.layers):
        where = f"{path}: layer {layer.name!r} ({layer.class_name})"
        if layer.explicit_mask is not None and not _mask_is_propagated(spec, index):
            raise LoadError(f"{where}: an explicit mask= computed by op layers is not supported; "
                            "use a Masking layer or Embedding(mask_zero=True)")
        try:
            engine_layer = _layer(spec, layer, dtype, where)
        except KeyError as exc:
            raise LoadError(f"{where}: missing tensor {exc.args[0]!r}") from exc
        except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: float(10**400) in a config
            if isinstance(exc, LoadError):
                raise
            raise LoadError(f"{where}: {exc}") from exc
        if engine_layer is not None:
            built.append(engine_layer)
    if not built:
        raise LoadError(f"{path}: the model has no layers lstm_engine can run")
    try:
        return Model(built, metadata={"source": "keras", "keras_version": spec.keras_version,
                                      "backend": spec.backend, "source_format": spec.source_format})
    except (TypeError, ValueError) as exc:
        raise LoadError(f"{path}: {exc}") from exc


def load_keras(path: str | os.PathLike, *, dtype: Any = None, config: Any = None) -> Model:
    """Load a ``.keras`` archive, a legacy ``.h5``, or a ``.weights.h5`` with its ``config``."""
    path = os.fspath(path)
    return model_from_spec(read_keras(path, config=config), path, dtype)


def from_keras(model: Any, *, dtype: Any = None) -> Model:
    """A Model from a live Keras model (saved to a temporary ``.keras`` and read back without Keras)."""
    if not hasattr(model, "save") or not hasattr(model, "get_config"):
        raise TypeError(f"from_keras: expected a keras.Model, got {type(model).__name__}")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        return load_keras(path, dtype=dtype)
