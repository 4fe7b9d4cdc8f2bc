"""The graph a Model runs: nodes of engine ops over named values, in topological order.

    Node(op, inputs, outputs, attrs, name, source)
    ValueInfo(name, dtype, shape)
    Graph(inputs, outputs, nodes, constants, layers, output_structure, metadata)

Contract (shared by the loaders: torch export, ONNX, the engine's file, chains of layers):

- ``op`` is an ONNX operator name with ONNX's semantics (opset 17; ``lstm_engine.ops.OPS`` lists them),
  ``If`` (attrs ``then_branch``/``else_branch``: sub-Graphs without inputs, which may read the outer
  graph's values), or an engine op: ``Recurrent`` and ``Layer`` (below). ONNX parameters given as
  constant inputs are attributes here (Reshape ``shape``, Slice ``starts``/``ends``/``axes``/``steps``,
  Squeeze/Unsqueeze and Reduce* ``axes``, Pad ``pads``, Expand ``shape``, Tile ``repeats``, Split
  ``split``, Clip ``min``/``max``). Attributes are JSON values only (sub-Graphs of If excepted).
- ``inputs``/``outputs`` name values; ``""`` is an omitted optional input or an unused output. Every
  value is defined once (a graph input, a constant, or one node's output) before any node reads it.
- ``ValueInfo.dtype`` is ``"float"`` (the dtype the model runs in: float32 or float64), ``"int64"``,
  ``"int32"`` or ``"bool"``; ``shape`` gives per dim an int, a name (str) or None. The dim named
  ``"steps"`` is the time axis: sessions stream over it (for one input without it, sessions take the axis
  that the graph carries to its recurrent layers' steps, proved op by op in ``stream.time_axes``); a dim
  named ``"batch"`` must equal a session's batch size. ``optional=True`` marks an input a caller may
  leave out (it then reads as omitted, ``""``, wherever it is used).
- ``constants`` are arrays (float ones are cast to the running dtype once); ``layers`` the
  LSTM/GRU/RNN (or other engine layer) objects the engine ops use by index.
- ``output_structure`` nests indices into ``outputs`` as the source returned them: 0, (0, 1), [0, (1, 2)].
- Constant subgraphs are folded once when the graph is compiled; a fold (or an Expand/Tile/Pad at run time)
  over ``ops.MAX_ELEMENTS`` elements is refused, so a model file cannot ask for terabytes.

``Recurrent`` {layer: k}: inputs [x (B, T, I) float, lengths (B,) int or "", h0 (D, B, P) or "", c0
(D, B, H) or "" (LSTM only)], outputs [y (B, T, D*P), h_n (D, B, P)] + [c_n (D, B, H)] for LSTM. Directions
are concatenated on y's last axis, each at its own timestep; with lengths, row b runs on its first
lengths[b] steps (packed semantics: outputs past them are 0, the states are taken at the row's last
valid step; a row of length 0 gives zero outputs and zero final states, as onnxruntime does). A layer built with Keras options (go_backwards, return_sequences=False, merge_mode) applies
them to y as ``RecurrentLayer.arrange`` does. An optional fifth input is a Keras mask (B, T) bool, and an
optional extra output the mask that follows the layer (chains of Keras layers only).

``Layer`` {layer: k}: a non-recurrent engine layer (``lstm_engine.layers``) of a chain: inputs [x, mask
or ""], outputs [y, mask or ""]; keeps Keras masking exact for the chains ``Model(layers)`` builds.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import ops as _ops
from .errors import LoadError, UnsupportedOpError

VALUE_DTYPES = ("float", "int64", "int32", "bool")
ENGINE_OPS = ("Recurrent", "Layer", "If")
TIME = "steps"


def supported_ops() -> list[str]:
    """Every op name a graph may use."""
    return sorted(set(_ops.OPS) | set(ENGINE_OPS))


@dataclass
class Node:
    op: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    name: str = ""
    source: str = ""

    def where(self) -> str:
        """How error messages name this node."""
        text = f"node {self.name!r} ({self.op})"
        return f"{text} from {self.source}" if self.source else text


@dataclass
class ValueInfo:
    name: str
    dtype: str = "float"
    shape: list = field(default_factory=list)
    optional: bool = False

    @property
    def time_axis(self) -> int | None:
        """The axis named "steps", if any."""
        return self.shape.index(TIME) if TIME in self.shape else None


@dataclass
class Graph:
    inputs: list[ValueInfo]
    outputs: list[str]
    nodes: list[Node]
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    layers: list = field(default_factory=list)
    output_structure: Any = None
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.output_structure is None:
            self.output_structure = 0 if len(self.outputs) == 1 else tuple(range(len(self.outputs)))

    def __repr__(self) -> str:
        lines = [f"Graph(inputs={[v.name for v in self.inputs]}, outputs={self.outputs},"]
        lines += [f"  {n.op}({', '.join(n.inputs)}) -> {', '.join(n.outputs)}" for n in self.nodes]
        return "\n".join(lines) + ")"

    def validate(self, where: str = "graph", outer: frozenset = frozenset()) -> None:
        """Check the graph is well formed; LoadError (UnsupportedOpError for an unknown op) naming the node.

        Every value defined once before it is read, every op known, its attributes of the right kinds
        and its inputs and outputs as many as it takes, layers and constants of the right types, the
        outputs and output_structure consistent. ``outer`` names the enclosing graph's values (If branches).
        """
        _check_list(self.inputs, ValueInfo, f"{where} inputs")
        _check_list(self.nodes, Node, f"{where} nodes")
        _check_list(self.outputs, str, f"{where} outputs")
        if not isinstance(self.constants, dict) or not isinstance(self.layers, list) \
                or not isinstance(self.metadata, dict):
            raise LoadError(f"{where}: constants must be a dict, layers a list and metadata a dict")
        defined: set[str] = set()

        def define(name: str, what: str) -> None:
            if not isinstance(name, str) or not name:
                raise LoadError(f"{where}: {what} has an empty or non-string value name {name!r}")
            if name in defined:
                raise LoadError(f"{where}: value {name!r} is defined twice (again by {what})")
            defined.add(name)

        for info in self.inputs:
            if info.dtype not in VALUE_DTYPES:
                raise LoadError(f"{where}: input {info.name!r} has dtype {info.dtype!r}; expected one of "
                                f"{list(VALUE_DTYPES)}")
            if not isinstance(info.shape, list) or not all(
                    d is None or isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                    for d in info.shape):
                raise LoadError(f"{where}: input {info.name!r} has shape {info.shape!r}; expected a list of "
                                "ints, names or None")
            if info.shape.count(TIME) > 1:
                raise LoadError(f"{where}: input {info.name!r} names two axes {TIME!r}")
            define(info.name, f"input {info.name!r}")
        for name, value in self.constants.items():
            if not isinstance(value, np.ndarray) or value.dtype.kind not in "fiub" or value.dtype.hasobject:
                raise LoadError(f"{where}: constant {name!r} must be a numeric NumPy array, got {type(value).__name__}")
            define(name, f"constant {name!r}")
        names: set[str] = set()
        for i, node in enumerate(self.nodes):
            if not isinstance(node.name, str) or not isinstance(node.source, str) or not isinstance(node.attrs, dict):
                raise LoadError(f"{where}: node {i} has a non-string name or source, or attrs that are not a dict")
            label = node.where() if node.name else f"node {i} ({node.op})"
            if not node.name or node.name in names:
                raise LoadError(f"{where}: {label}: every node needs a unique name")
            names.add(node.name)
            _check_list(node.inputs, str, f"{where}: {label} inputs")
            _check_list(node.outputs, str, f"{where}: {label} outputs")
            self._check_node(node, label, where)
            for name in node.inputs:
                if name and name not in defined and name not in outer:
                    raise LoadError(f"{where}: {label} reads {name!r}, which no input, constant or earlier "
                                    "node defines")
            if node.op == "If":
                for branch in ("then_branch", "else_branch"):
                    node.attrs[branch].validate(f"{where}: {label} {branch}", frozenset(defined | outer))
            for name in node.outputs:
                if name:
                    define(name, label)
        if not self.outputs:
            raise LoadError(f"{where}: the graph has no outputs")
        for name in self.outputs:
            if name not in defined and name not in outer:
                raise LoadError(f"{where}: output {name!r} is not defined by any input, constant or node")
        used = _structure_indices(self.output_structure, where)
        if sorted(used) != list(range(len(self.outputs))):
            raise LoadError(f"{where}: output_structure {self.output_structure!r} must use each index of the "
                            f"{len(self.outputs)} outputs once")
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as exc:
            raise LoadError(f"{where}: metadata must be JSON-serialisable: {exc}") from None

    def _check_node(self, node: Node, label: str, where: str) -> None:
        from ._recurrent import RecurrentLayer
        from ._base import Layer

        op = node.op
        if op not in _ops.OPS and op not in ENGINE_OPS:
            raise UnsupportedOpError(op, node.source or f"{where} node {node.name!r}", supported_ops())
        n_in, n_out = len(node.inputs), len(node.outputs)
        if op in ("Recurrent", "Layer"):
            if set(node.attrs) != {"layer"}:
                raise LoadError(f"{where}: {label}: expected attrs {{'layer': index}}, got {sorted(node.attrs)}")
            k = node.attrs["layer"]
            if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(self.layers):
                raise LoadError(f"{where}: {label}: layer {k!r} is not an index into the graph's "
                                f"{len(self.layers)} layers")
            layer = self.layers[k]
            if op == "Recurrent":
                if not isinstance(layer, RecurrentLayer):
                    raise LoadError(f"{where}: {label}: layer {k} is a {type(layer).__name__}, not an LSTM, GRU or RNN")
                states = len(layer.state_shapes)
                # A mask output follows the states only where a mask input (the fifth) is given.
                if not 1 <= n_in <= 5 or (states == 1 and n_in > 3 and node.inputs[3]) \
                        or n_out not in ((1 + states, 2 + states) if n_in == 5 else (1 + states,)) \
                        or not node.inputs[0]:
                    raise LoadError(f"{where}: {label}: expected inputs [x, lengths, h0"
                                    f"{', c0' if states == 2 else ''}] and outputs [y, h_n"
                                    f"{', c_n' if states == 2 else ''}], got {n_in} inputs and {n_out} outputs")
            else:
                if isinstance(layer, RecurrentLayer) or not isinstance(layer, Layer):
                    raise LoadError(f"{where}: {label}: layer {k} ({type(layer).__name__}) is not a non-recurrent "
                                    "engine layer")
                if n_in not in (1, 2) or n_out not in (1, 2) or not node.inputs[0]:
                    raise LoadError(f"{where}: {label}: expected inputs [x, mask] and outputs [y, mask]")
            return
        if op == "If":
            if set(node.attrs) != {"then_branch", "else_branch"} or not all(
                    isinstance(node.attrs[b], Graph) for b in node.attrs):
                raise LoadError(f"{where}: {label}: expected attrs then_branch and else_branch, each a Graph")
            for b in ("then_branch", "else_branch"):
                branch = node.attrs[b]
                if branch.inputs or len(branch.outputs) != n_out:
                    raise LoadError(f"{where}: {label}: {b} must take no inputs and give {n_out} outputs")
            if n_in != 1 or not node.inputs[0]:
                raise LoadError(f"{where}: {label}: expected one input, the condition")
            return
        spec = _ops.OPS[op]
        if not spec.inputs[0] <= n_in <= spec.inputs[1] or not spec.outputs[0] <= n_out <= spec.outputs[1]:
            raise LoadError(f"{where}: {label}: takes {_count(spec.inputs)} inputs and gives {_count(spec.outputs)} "
                            f"outputs, got {n_in} and {n_out}")
        optional = _OPTIONAL_INPUTS.get(op, ())
        for j, name in enumerate(node.inputs):
            if not name and j not in optional:
                raise LoadError(f"{where}: {label}: input {j} is required")
        try:
            _ops.check_attrs(op, node.attrs)
            _check_json(node.attrs)
        except ValueError as exc:
            raise LoadError(f"{where}: {label}: {exc}") from None


# Inputs an op may omit ("").
_OPTIONAL_INPUTS = {"Gemm": (2,), "LayerNormalization": (2,), "Conv": (2,)}


def _count(bounds: tuple[int, int]) -> str:
    lo, hi = bounds
    return str(lo) if lo == hi else f"{lo} or more" if hi >= _ops.VARIADIC else f"{lo} to {hi}"


def _check_list(value: Any, kind: type, what: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
        raise LoadError(f"{what}: expected a list of {kind.__name__}, got {value!r:.200}")


def _check_json(value: Any, depth: int = 0) -> None:
    if depth > 8:
        raise ValueError("attributes nest too deep")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_json(v, depth + 1)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _check_json(v, depth + 1)
    elif isinstance(value, float):
        if not math.isfinite(value) and not math.isinf(value):
            raise ValueError("attribute value NaN")
    elif value is not None and not isinstance(value, (int, str, bool)):
        raise ValueError(f"attribute value of type {type(value).__name__} is not JSON")


def _structure_indices(structure: Any, where: str, depth: int = 0) -> list[int]:
    if depth > 32:
        raise LoadError(f"{where}: output_structure nests too deep")
    if isinstance(structure, bool):
        raise LoadError(f"{where}: output_structure holds {structure!r}")
    if isinstance(structure, int):
        return [structure]
    if isinstance(structure, (list, tuple)):
        return [i for s in structure for i in _structure_indices(s, where, depth + 1)]
    raise LoadError(f"{where}: output_structure holds {structure!r}; expected ints in tuples and lists")


def id_range(graph: Graph, name: str) -> int | None:
    """For an integer input that is only looked up in constant tables (Gather on axis 0, or a chain's
    Embedding layer), how many ids every lookup takes; None if something else reads it."""
    sizes = []
    for node in graph.nodes:
        if name not in node.inputs:
            continue
        if node.op == "Gather" and node.inputs[1] == name and node.inputs[0] in graph.constants \
                and node.attrs.get("axis", 0) == 0 and node.inputs[0] != name:
            sizes.append(graph.constants[node.inputs[0]].shape[0])
        elif node.op == "Layer" and node.inputs[0] == name and hasattr(graph.layers[node.attrs["layer"]],
                                                                       "num_embeddings"):
            sizes.append(graph.layers[node.attrs["layer"]].num_embeddings)
        else:
            return None
    return min(sizes) if sizes else None


def build_structure(structure: Any, values: list) -> Any:
    """The outputs arranged as ``structure`` says."""
    if isinstance(structure, int):
        return values[structure]
    items = [build_structure(s, values) for s in structure]
    return tuple(items) if isinstance(structure, tuple) else items
