"""ONNX models: a ``.onnx`` file's graph as the engine's graph (``le.load("model.onnx")``).

The ``onnx`` package (``pip install onnx``, or ``pip install ".[onnx]"`` from a checkout) parses the
protobuf and infers shapes; the model then runs on the engine's own ops and kernels. ``LSTM``, ``GRU`` and ``RNN`` become ``Recurrent``
nodes over engine layers (every attribute of the ONNX spec), with the Transpose/Reshape nodes that give
ONNX's layouts; the other operators map one to one onto ``lstm_engine.ops``. Everything computable
from the file alone — initializers assembled by Slice/Concat, ``Constant`` nodes, shapes known at
load, ``If`` on a constant condition — is folded once here. Shapes that depend on an input's size
(torch's dynamic axes) are tracked symbolically so that Reshape/Expand targets and zero initial states
still fold; what cannot be folded or mapped raises ``UnsupportedOpError``/``LoadError`` naming the node.

Model files are untrusted: tensors stored outside the file (external data) are refused, never read,
and sizes are checked before anything is allocated.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import ops as _ops
from ..errors import LoadError, UnsupportedOpError
from ..graph import Graph, Node, ValueInfo
from ..gru import GRU
from ..lstm import LSTM
from ..model import Model
from ..rnn import RNN

# A constant folded at load, or a tensor in the file, may hold at most this many elements (2 GiB of float64).
MAX_ELEMENTS = 1 << 28
MAX_FILE_BYTES = (1 << 31) - 1  # protobuf's own limit
MIN_OPSET = 7  # LSTM/GRU/RNN as they are today (opset 7 dropped the 'output_sequence' attribute)

# ONNX TensorProto element types.
_FLOAT, _UINT8, _INT8, _INT32, _INT64, _BOOL, _FLOAT16, _DOUBLE = 1, 2, 3, 6, 7, 9, 10, 11
_NUMPY = {_FLOAT: np.float32, _DOUBLE: np.float64, _INT64: np.int64, _INT32: np.int32, _BOOL: np.bool_,
          _UINT8: np.uint8, _INT8: np.int8, _FLOAT16: np.float16}
_VALUE_DTYPE = {_FLOAT: "float", _DOUBLE: "float", _INT64: "int64", _INT32: "int32", _BOOL: "bool"}


def load_onnx(path: str | os.PathLike, *, dtype: Any = None) -> Model:
    """A Model from an ONNX file. ``dtype`` (float32 or float64) defaults to the graph's float inputs' type.

    ``model.run(feeds)`` then takes and gives the graph's own input and output names and layouts, as
    ``onnxruntime.InferenceSession(path).run(None, feeds)`` does (as a dict).
    """
    path = os.fspath(path)
    proto = read_model(path)
    graph = graph_from_onnx(proto, path, dtype)
    try:
        return Model(graph)
    except ValueError as exc:  # the graph's own checks (LoadError among them), naming the file
        if isinstance(exc, LoadError) and path in str(exc):
            raise
        raise LoadError(f"{path}: {exc}") from None


def read_model(path: str) -> Any:
    """The ModelProto of a file, with shapes inferred; LoadError for anything that is not a sound ONNX model."""
    try:
        import onnx
    except ImportError as exc:
        raise LoadError(f"{path}: an ONNX file; reading it needs the onnx package: "
                        "pip install onnx (from an lstm_engine checkout: pip install \".[onnx]\")") from exc
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise LoadError(f"{path}: {size} bytes, over protobuf's 2 GiB limit for one ONNX file")
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise LoadError(f"{path}: cannot be read: {exc.strerror or exc}") from exc
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError, and RuntimeError/ValueError from some builds
        raise LoadError(f"{path}: not a readable ONNX model (protobuf: {exc})") from None
    if not proto.HasField("graph"):
        raise LoadError(f"{path}: not an ONNX model (no graph)")
    _check_graph(proto.graph, path)
    try:
        proto = onnx.shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
    except Exception:  # shapes are a help, not a requirement: the conversion says what it cannot fold
        pass
    return proto


def _check_graph(graph: Any, path: str, depth: int = 0) -> None:
    """LoadError if any tensor (in any sub-graph) keeps its data in another file — paths in a model are never
    read — or a name is not text (protobuf hands invalid UTF-8 back as bytes)."""
    if depth > 32:
        raise LoadError(f"{path}: sub-graphs nest deeper than 32 levels")
    tensors = list(graph.initializer) + [s.values for s in graph.sparse_initializer]
    names = [vi.name for vi in list(graph.input) + list(graph.output) + list(graph.value_info)]
    names += [d.dim_param for vi in graph.input for d in vi.type.tensor_type.shape.dim]
    for node in graph.node:
        names += list(node.input) + list(node.output) + [node.name, node.op_type, node.domain]
        for attr in node.attribute:
            names.append(attr.name)
            if attr.HasField("t"):
                tensors.append(attr.t)
            tensors.extend(attr.tensors)
            if attr.HasField("g"):
                _check_graph(attr.g, path, depth + 1)
            for g in attr.graphs:
                _check_graph(g, path, depth + 1)
    bad = next((n for n in names + [t.name for t in tensors] if not isinstance(n, str)), None)
    if bad is not None:
        raise LoadError(f"{path}: a name in the graph is not valid UTF-8 text: {bad[:60]!r}")
    for t in tensors:
        if t.data_location == 1 or len(t.external_data):
            raise LoadError(f"{path}: tensor {t.name!r} keeps its data in an external file; lstm_engine reads "
                            "only self-contained ONNX files (save with onnx.save(model, path, "
                            "save_as_external_data=False))")


def graph_from_onnx(proto: Any, source: str, dtype: Any = None) -> Graph:
    """The engine's Graph of a ModelProto; ``source`` names the file in errors."""
    opsets = {(imp.domain or "ai.onnx"): imp.version for imp in proto.opset_import}
    opset = opsets.get("ai.onnx")
    if opset is None:
        raise LoadError(f"{source}: the model imports no standard ONNX opset (ai.onnx)")
    if opset < MIN_OPSET:
        raise LoadError(f"{source}: opset {opset}; lstm_engine reads opset {MIN_OPSET} and later "
                        "(convert with onnx.version_converter)")
    inferred = {}
    for vi in list(proto.graph.value_info) + list(proto.graph.output) + list(proto.graph.input):
        inferred[vi.name] = vi
    conv = _Converter(source, opset, inferred, dtype)
    graph = conv.main_graph(proto.graph)
    graph.metadata = {"source_format": "onnx", "opset": int(opset), "producer": str(proto.producer_name)[:200]}
    return graph


# -- values while converting --------------------------------------------------------------------------

@dataclass
class _Run:
    """A value computed when the model runs: its name in the engine's graph, dtype and shape if known."""
    name: str
    dtype: str | None = None
    shape: list | None = None  # per dim: int, a name (str) or None; None if the rank is unknown


@dataclass
class _Sym:
    """A small int64 tensor (0-D or 1-D) of sizes, some known only when the model runs (names of input dims).

    ``rebuild()`` emits the run-time computation (once) when the value must exist as a tensor after all,
    and returns its name.
    """
    dims: tuple
    scalar: bool = False
    rebuild: Any = None
    built: str | None = None

    @property
    def known(self) -> bool:
        return all(isinstance(d, int) for d in self.dims)

    def array(self) -> np.ndarray:
        a = np.array(self.dims, np.int64)
        return a.reshape(()) if self.scalar else a


@dataclass
class _Fill:
    """A tensor of one value whose shape has sizes known only at run time (ConstantOfShape of a _Sym).

    ``size`` is the _Sym it was made from, if unchanged since: the run-time ConstantOfShape can rebuild it.
    """
    value: np.ndarray
    shape: tuple
    size: Any = None


@dataclass
class _Scope:
    """The values one graph (or an If branch) can see; a branch falls back to its parent's."""
    values: dict = field(default_factory=dict)
    parent: Any = None

    def get(self, name: str) -> Any:
        scope = self
        while scope is not None:
            if name in scope.values:
                return scope.values[name]
            scope = scope.parent
        return None


_ACTIVATIONS = {
    # ONNX name (lower case) -> engine name, (alpha, beta) defaults, which ones it takes.
    # None as a default: onnxruntime (0) and the spec (the old operators' defaults) disagree; refuse.
    "sigmoid": ("sigmoid", ()), "tanh": ("tanh", ()), "relu": ("relu", ()),
    "softsign": ("softsign", ()), "softplus": ("softplus", ()),
    "affine": ("affine", (None, None)), "leakyrelu": ("leaky_relu", (0.01,)),
    "thresholdedrelu": ("thresholded_relu", (None,)), "scaledtanh": ("scaled_tanh", (None, None)),
    "hardsigmoid": ("hard_sigmoid", (0.2, 0.5)), "elu": ("elu", (1.0,)),
}
# Gate blocks of the engine's (PyTorch's) order, as indices into ONNX's order.
_LSTM_ORDER = [0, 2, 3, 1]  # ONNX i, o, f, c -> i, f, g, o
_GRU_ORDER = [1, 0, 2]  # ONNX z, r, h -> r, z, n
_PEEPHOLE_ORDER = [0, 2, 1]  # ONNX i, o, f -> i, f, o
# Ops that map one to one, with their ONNX attributes as they are (defaults filled by lstm_engine.ops).
_DIRECT = {
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Abs", "Exp", "Log", "Reciprocal", "Erf", "Max", "Min",
    "Where", "Equal", "Less", "Greater", "Not", "And", "Relu", "Tanh", "Sigmoid", "Gelu", "Elu", "LeakyRelu",
    "HardSigmoid", "Softplus", "Softsign", "MatMul", "Gemm", "Einsum", "Transpose", "Flatten", "Concat",
    "Gather", "ArgMax", "Identity",
}
# Ops computed only when the model runs as far as folding goes (they read no file-dependent parameter).
_HANDLED = sorted(_DIRECT | {
    "LSTM", "GRU", "RNN", "Constant", "ConstantOfShape", "Shape", "Size", "Cast", "Reshape", "Squeeze",
    "Unsqueeze", "Slice", "Split", "Expand", "Tile", "Pad", "Clip", "ReduceMean", "ReduceSum", "ReduceMax",
    "ReduceMin", "ReduceL2", "Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization", "Conv",
    "Dropout", "If", "Range", "ConstantOfShape", "Sum", "Mean", "PRelu", "Selu", "HardSwish", "GlobalAveragePool",
    "GlobalMaxPool",
})


def _result_size(op: str, arrays: list, attrs: dict) -> float:
    """An upper bound on the elements an op makes from these inputs, for the ops whose result can be far larger
    than their inputs (checked before folding, so that a file cannot make the loader allocate without bound)."""
    shapes = [a.shape for a in arrays if a is not None]
    if op == "Expand":
        return float(np.prod(np.broadcast_shapes(shapes[0], tuple(attrs["shape"])), dtype=np.float64))
    if op == "Tile":
        return float(np.prod(shapes[0], dtype=np.float64)) * float(np.prod(attrs["repeats"], dtype=np.float64))
    if op == "Pad":
        grow = sum(abs(p) for p in attrs["pads"])
        return float(np.prod([n + grow for n in shapes[0]], dtype=np.float64))
    if op in ("MatMul", "Gemm", "Einsum", "Conv"):
        # Every output dim is one of the inputs' dims: the product of the largest ones bounds it.
        dims = sorted((d for s in shapes for d in s), reverse=True)
        rank = max((len(s) for s in shapes), default=0) + (1 if op != "Conv" else 0)
        return float(np.prod(dims[:rank], dtype=np.float64))
    return 0.0


def supported_ops() -> list[str]:
    """The ONNX operators (default domain) the loader maps."""
    return list(_HANDLED)


class _Converter:
    """Walks an ONNX graph once, folding what the file alone determines and emitting the rest as engine nodes."""

    def __init__(self, source: str, opset: int, inferred: dict, dtype: Any, parent: "_Converter | None" = None,
                 scope: _Scope | None = None) -> None:
        self.source = source
        self.opset = opset
        self.inferred = inferred
        self.scope = scope or _Scope()
        self.nodes: list[Node] = []
        self.constants: dict[str, np.ndarray] = {}
        # One list for the graph and its If branches (a layer's index is unique in the model).
        self.layers: list = parent.layers if parent else []
        self.taken: set[str] = parent.taken if parent else set()  # value names
        self.node_names: set[str] = parent.node_names if parent else set()
        self.float_dtype = None if dtype is None else np.dtype(dtype)
        if self.float_dtype is not None and self.float_dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype: expected float32 or float64, got {self.float_dtype}")
        self.where = ""  # the node being converted, for messages
        self.stored: dict[int, tuple[np.ndarray, str]] = {}  # id(array) -> (array, its constant's name)
        self.pending: set[str] = set()  # initializers' names, stored as constants once a node reads them

    # -- names and errors ---------------------------------------------------------------------------
    def fresh(self, hint: str, taken: set | None = None) -> str:
        """A value name (or, with taken=self.node_names, a node name) not used so far in the file or the graph."""
        taken = self.taken if taken is None else taken
        name, k = hint, 0
        while name in taken:
            k += 1
            name = f"{hint}.{k}"
        taken.add(name)
        return name

    def error(self, message: str) -> LoadError:
        return LoadError(f"{self.source}: {self.where}: {message}")

    # -- the graph ----------------------------------------------------------------------------------
    def main_graph(self, g: Any) -> Graph:
        self._reserve(g)
        inits = {}
        for t in g.initializer:
            inits[t.name] = self.tensor(t, f"initializer {t.name!r}")
        if len(g.sparse_initializer):
            raise LoadError(f"{self.source}: sparse initializers are not supported")
        inputs = []
        float_types = set()
        for vi in g.input:
            if vi.name in inits:
                continue  # IR < 4 lists initializers among the inputs too; they are constants
            info = self._value_info(vi)
            float_types |= {vi.type.tensor_type.elem_type} & {_FLOAT, _DOUBLE}
            inputs.append(info)
            self.scope.values[vi.name] = _Run(vi.name, info.dtype, list(info.shape))
        if self.float_dtype is None:
            self.float_dtype = np.dtype(np.float64 if float_types == {_DOUBLE} else np.float32)
        for name, arr in inits.items():
            self.scope.values[name] = arr
            self.stored[id(arr)] = (arr, name)
            self.pending.add(name)
        for node in g.node:
            self.convert(node)
        outputs = self._outputs([o.name for o in g.output])
        self.where = "graph"
        return Graph(inputs, outputs, self.nodes, self.constants, self.layers, None, {})

    def _reserve(self, g: Any, depth: int = 0) -> None:
        """Every value name in the file (sub-graphs too): generated names must not clash with them."""
        for vi in list(g.input) + list(g.output):
            self.taken.add(vi.name)
        for t in g.initializer:
            self.taken.add(t.name)
        for node in g.node:
            self.taken.update(node.output)
            for attr in node.attribute:
                if attr.HasField("g") and depth < 32:
                    self._reserve(attr.g, depth + 1)

    def _value_info(self, vi: Any) -> ValueInfo:
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or tt.elem_type not in _VALUE_DTYPE:
            raise LoadError(f"{self.source}: input {vi.name!r} is not a tensor of float, double, int64, int32 or "
                            f"bool (element type {tt.elem_type})")
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim] \
            if tt.HasField("shape") else []
        return ValueInfo(vi.name, _VALUE_DTYPE[tt.elem_type], shape)

    def _outputs(self, names: list[str]) -> list[str]:
        """The graph's outputs as engine values named as in the file (Identity nodes for aliases, constants stored)."""
        out = []
        for name in names:
            v = self.scope.get(name)
            if v is None:
                raise LoadError(f"{self.source}: graph output {name!r} is computed by no node")
            if isinstance(v, _Run) and v.name == name:
                out.append(name)
                continue
            if isinstance(v, _Run):
                self.nodes.append(Node("Identity", [v.name], [name], {}, self.fresh(f"{name}.output", self.node_names),
                                       f"ONNX graph output {name!r}"))
            else:
                self.constants[name] = self.materialize(v)
            out.append(name)
        return out

    # -- tensors ------------------------------------------------------------------------------------
    def tensor(self, t: Any, what: str) -> np.ndarray:
        """A TensorProto as an array; LoadError for external data, unknown types or sizes that do not add up."""
        from onnx import numpy_helper

        if t.data_location == 1 or len(t.external_data):
            raise LoadError(f"{self.source}: {what} keeps its data in an external file; refused")
        if t.data_type not in _NUMPY:
            raise LoadError(f"{self.source}: {what} has element type {t.data_type}; supported: float, double, "
                            "float16, int64, int32, int8, uint8, bool")
        dims = list(t.dims)
        if any(d < 0 for d in dims) or len(dims) > 16:
            raise LoadError(f"{self.source}: {what} has dims {dims[:17]}")
        n = 1
        for d in dims:
            n *= d
            if n > MAX_ELEMENTS:
                raise LoadError(f"{self.source}: {what} has dims {dims}, over {MAX_ELEMENTS} elements")
        itemsize = np.dtype(_NUMPY[t.data_type]).itemsize
        if t.HasField("raw_data"):
            if len(t.raw_data) != n * itemsize:
                raise LoadError(f"{self.source}: {what}: dims {dims} need {n * itemsize} bytes, the file holds "
                                f"{len(t.raw_data)}")
        else:
            stored = max(len(t.float_data), len(t.double_data), len(t.int32_data), len(t.int64_data),
                         len(t.uint64_data))
            if stored != n:
                raise LoadError(f"{self.source}: {what}: dims {dims} need {n} values, the file holds {stored}")
        try:
            arr = numpy_helper.to_array(t)
        except Exception as exc:
            raise LoadError(f"{self.source}: {what} cannot be read: {exc}") from None
        return np.array(arr, dtype=_NUMPY[t.data_type]).reshape(dims)

    def materialize(self, v: Any) -> np.ndarray:
        """A load-time value as an array; LoadError when it depends on sizes known only at run time."""
        if isinstance(v, np.ndarray):
            return v
        if isinstance(v, _Sym):
            if not v.known:
                raise self.error(f"a shape holds sizes known only at run time ({v.dims}) where lstm_engine needs "
                                 "them at load")
            return v.array()
        if isinstance(v, _Fill):
            if not all(isinstance(d, int) for d in v.shape):
                raise self.error(f"a tensor of shape {v.shape} filled with {v.value.item()!r}: its size is known "
                                 "only at run time")
            if np.prod(v.shape, dtype=np.float64) > MAX_ELEMENTS:
                raise self.error(f"a constant of shape {v.shape} is over {MAX_ELEMENTS} elements")
            return np.full(v.shape, v.value, v.value.dtype)
        raise self.error("a value computed at run time is used where lstm_engine needs a constant")

    def check_size(self, a: np.ndarray) -> np.ndarray:
        if a.size > MAX_ELEMENTS:
            raise self.error(f"a folded constant of shape {a.shape} is over {MAX_ELEMENTS} elements")
        return a

    def ref(self, v: Any, hint: str) -> str:
        """The engine graph's name for a value: run-time values as they are, others stored as constants."""
        if isinstance(v, _Run):
            return v.name
        if isinstance(v, _Sym) and not v.known and v.rebuild is not None:
            if v.built is None:
                v.built = v.rebuild()
            return v.built
        if isinstance(v, _Fill) and v.size is not None and not all(isinstance(d, int) for d in v.shape):
            return self.constant_of_shape(self.ref(v.size, "shape"), v.value)[0].name
        if isinstance(v, np.ndarray) and id(v) in self.stored:
            name = self.stored[id(v)][1]  # one copy of a weight several nodes read, under its own name
            if name in self.pending:
                self.pending.discard(name)
                self.constants[name] = v
            return name
        arr = self.materialize(v)
        name = self.fresh(hint)
        self.constants[name] = arr
        if isinstance(v, np.ndarray):
            self.stored[id(v)] = (v, name)
        return name

    # -- nodes --------------------------------------------------------------------------------------
    def convert(self, node: Any) -> None:
        self.where = f"ONNX node {node.name!r} ({node.op_type})"
        if node.domain not in ("", "ai.onnx"):
            raise UnsupportedOpError(f"{node.domain}::{node.op_type}", f"{self.source}: {self.where}",
                                     supported_ops())
        handler = getattr(self, f"op_{node.op_type}", None)
        if handler is None and node.op_type not in _DIRECT:
            raise UnsupportedOpError(node.op_type, f"{self.source}: {self.where}", supported_ops())
        self.check_arity(node)
        ins = []
        for name in node.input:
            if not name:
                ins.append(None)
                continue
            v = self.scope.get(name)
            if v is None:
                raise self.error(f"reads {name!r}, which no input, initializer or earlier node defines "
                                 "(the nodes must be in topological order)")
            ins.append(v)
        attrs = self.attributes(node)
        try:
            outs = handler(node, ins, attrs) if handler else self.direct(node, ins, attrs)
        except (IndexError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            # A node whose attributes or inputs are not of the kinds the spec gives (a damaged file).
            raise self.error(f"malformed node: {type(exc).__name__}: {exc}") from None
        for name, v in zip(node.output, outs):
            if name:
                self.scope.values[name] = v

    def check_arity(self, node: Any) -> None:
        """The node's input and output counts against its operator's schema at the model's opset."""
        from onnx import defs

        try:
            schema = defs.get_schema(node.op_type, self.opset, "")
        except Exception:
            if node.op_type not in _HANDLED:
                raise UnsupportedOpError(node.op_type, f"{self.source}: {self.where}", supported_ops()) from None
            raise self.error(f"{node.op_type} is not an operator of opset {self.opset} (the model's); "
                             "the file is not valid ONNX") from None
        n_in, n_out = len(node.input), len(node.output)
        if not schema.min_input <= n_in <= schema.max_input or not schema.min_output <= n_out <= schema.max_output:
            raise self.error(f"{n_in} inputs and {n_out} outputs; {node.op_type} (opset {schema.since_version}) "
                             f"takes {schema.min_input}..{schema.max_input} inputs and "
                             f"{schema.min_output}..{schema.max_output} outputs")

    def attributes(self, node: Any) -> dict:
        from onnx import helper

        out = {}
        for attr in node.attribute:
            if attr.type == 5:  # GRAPH: kept as the proto for If
                out[attr.name] = attr.g
                continue
            if attr.type in (4, 9, 10, 11, 12, 13):  # TENSOR(S), GRAPHS, SPARSE_TENSOR(S)
                out[attr.name] = attr
                continue
            try:
                value = helper.get_attribute_value(attr)
            except Exception as exc:
                raise self.error(f"attribute {attr.name!r} cannot be read: {exc}") from None
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, list):
                value = [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in value]
                if len(value) > 4096:
                    raise self.error(f"attribute {attr.name!r} has {len(value)} values")
            out[attr.name] = value
        return out

    def emit(self, op: str, inputs: list[str], attrs: dict, outputs: list[str] | None = None,
             n_out: int = 1, hint: str = "") -> list[_Run]:
        """Append an engine node; returns its outputs as run-time values (fresh names unless given)."""
        node_name = self.fresh(hint or f"{op}", self.node_names)
        if outputs is None:
            outputs = [self.fresh(f"{node_name}.out{i}" if n_out > 1 else f"{node_name}.out") for i in range(n_out)]
        self.nodes.append(Node(op, inputs, outputs, attrs, node_name, f"{self.source}: {self.where}"))
        return [_Run(o) if o else None for o in outputs]

    def fold(self, op: str, arrays: list, attrs: dict, n_out: int = 1) -> list:
        """Run an op of lstm_engine.ops on constants at load."""
        spec = _ops.OPS[op]
        try:
            checked = _ops.check_attrs(op, attrs)
            size = _result_size(op, arrays, checked)
        except (ValueError, TypeError, IndexError) as exc:
            raise self.error(f"cannot be computed on its constant inputs: {exc}") from None
        if size > MAX_ELEMENTS:
            raise self.error(f"folding it at load would make {size:.3g} elements (over {MAX_ELEMENTS})")
        try:
            extra = {"_outputs": n_out} if op == "Split" else {}
            with np.errstate(all="ignore"):
                result = spec.fn(*arrays, **checked, **extra)
        except (ValueError, TypeError, IndexError) as exc:
            raise self.error(f"cannot be computed on its constant inputs: {exc}") from None
        results = list(result) if isinstance(result, (tuple, list)) else [result]
        return [self.check_size(np.asarray(r)) for r in results]

    def run_or_fold(self, node: Any, op: str, ins: list, attrs: dict) -> list:
        """Fold when every input is known at load, else emit the engine node with ONNX's output names."""
        if all(v is None or isinstance(v, np.ndarray) or (isinstance(v, _Sym) and v.known) for v in ins):
            arrays = [None if v is None else self.materialize(v) for v in ins]
            while arrays and arrays[-1] is None:
                arrays.pop()
            return self.fold(op, arrays, attrs, len(node.output))
        names = [("" if v is None else self.ref(v, f"{node.name or op}.in{i}")) for i, v in enumerate(ins)]
        while names and not names[-1]:
            names.pop()
        return self.emit(op, names, attrs, [o for o in node.output], hint=node.name or op)

    def direct(self, node: Any, ins: list, attrs: dict) -> list:
        return self.run_or_fold(node, node.op_type, ins, attrs)

    def const_input(self, v: Any, what: str, required: bool = True) -> np.ndarray | None:
        """An input ONNX passes as a tensor but lstm_engine needs at load (a shape, axes, pads...)."""
        if v is None:
            if required:
                raise self.error(f"input {what!r} is required")
            return None
        if isinstance(v, _Run):
            raise self.error(f"input {what!r} is computed when the model runs; lstm_engine needs it at load "
                             "(export with static shapes, or constant-fold the model)")
        return self.materialize(v)

    def ints_input(self, v: Any, what: str, required: bool = True) -> list[int] | None:
        a = self.const_input(v, what, required)
        if a is None:
            return None
        if a.dtype.kind not in "iu" or a.ndim > 1:
            raise self.error(f"input {what!r} must be a 1-D integer tensor, got {a.dtype} {a.shape}")
        return [int(x) for x in a.reshape(-1)]

    def shape_of(self, v: Any) -> list | None:
        """What is known of a value's shape at load: ints, names of input dims, None where unknown."""
        if isinstance(v, np.ndarray):
            return list(v.shape)
        if isinstance(v, _Sym):
            return [] if v.scalar else [len(v.dims)]
        if isinstance(v, _Fill):
            return list(v.shape)
        if isinstance(v, _Run):
            if v.shape is not None:
                return v.shape
            vi = self.inferred.get(v.name)
            if vi is not None and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                        for d in vi.type.tensor_type.shape.dim]
        return None

    def rank_of(self, v: Any) -> int | None:
        shape = self.shape_of(v)
        return None if shape is None else len(shape)

    def sym(self, dims: Any, scalar: bool, op: str, ins: list, attrs: dict) -> _Sym:
        """A _Sym computed by ``op`` from ``ins``; emitted as that op if it is needed at run time."""
        def rebuild() -> str:
            names = [self.ref(v, f"{op}.in") for v in ins]
            return self.emit(op, names, attrs, hint=op)[0].name
        return _Sym(tuple(dims), scalar, rebuild)

    # -- constants and shapes -----------------------------------------------------------------------
    def op_Constant(self, node: Any, ins: list, attrs: dict) -> list:
        if "value" in attrs:
            return [self.tensor(attrs["value"].t, f"{self.where} value")]
        for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                        ("value_ints", np.int64)):
            if key in attrs:
                return [np.array(attrs[key], dt)]
        raise self.error(f"a Constant with {sorted(attrs)}; supported: value, value_float(s), value_int(s)")

    def op_Identity(self, node: Any, ins: list, attrs: dict) -> list:
        return [ins[0]]

    def op_Dropout(self, node: Any, ins: list, attrs: dict) -> list:
        # Inference: Dropout is the identity. A training_mode input that is true would mean otherwise.
        if len(ins) > 2 and ins[2] is not None:
            mode = self.const_input(ins[2], "training_mode")
            if mode.any():
                raise self.error("Dropout in training mode is random; lstm_engine runs inference only")
        if len(node.output) > 1 and node.output[1]:
            raise self.error("Dropout's mask output is used; lstm_engine runs inference only")
        return [ins[0]]

    def op_Shape(self, node: Any, ins: list, attrs: dict) -> list:
        shape = self.shape_of(ins[0])
        start, end = attrs.get("start", 0), attrs.get("end")
        if shape is not None and all(d is not None for d in shape):
            return [self.sym(shape[slice(start, end)], False, "Shape", ins[:1], {"start": start, "end": end})]
        out = self.emit("Shape", [self.ref(ins[0], "shape.in")], {"start": start, "end": end}, list(node.output),
                        hint=node.name or "Shape")
        out[0].shape = [None]  # a shape is 1-D, whatever the rank it describes
        return out

    def op_Size(self, node: Any, ins: list, attrs: dict) -> list:
        shape = self.shape_of(ins[0])
        if shape is not None and all(isinstance(d, int) for d in shape):
            return [np.array(int(np.prod(shape)), np.int64)]
        if shape is not None and len(shape) == 1:  # the size of a 1-D tensor is its one dim (Size of a Shape)
            n = self.emit("Shape", [self.ref(ins[0], "size.in")], {"start": 0, "end": None}, hint=node.name or "Size")
            return self.emit("Squeeze", [n[0].name], {"axes": [0]}, list(node.output), hint=node.name or "Size")
        raise self.error("Size of a tensor whose shape is known only at run time")

    def op_ConstantOfShape(self, node: Any, ins: list, attrs: dict) -> list:
        value = np.zeros((), np.float32)
        if "value" in attrs:
            value = self.tensor(attrs["value"].t, f"{self.where} value").reshape(())
        shape = ins[0]
        if isinstance(shape, _Sym) and not shape.known:
            return [_Fill(value, shape.dims, shape)]
        if isinstance(shape, _Run):
            return self.constant_of_shape(shape.name, value, list(node.output))
        dims = self.ints_input(shape, "input")
        if any(d < 0 for d in dims):
            raise self.error(f"shape {dims} has a negative size")
        return [_Fill(value, tuple(dims)) if np.prod(dims, dtype=np.float64) > MAX_ELEMENTS
                else np.full(dims, value, value.dtype)]

    def constant_of_shape(self, shape: str, value: np.ndarray, outputs: list | None = None) -> list:
        kind = {"f": "float", "b": "bool"}.get(value.dtype.kind, str(value.dtype))
        if kind not in ("float", "bool", "int64", "int32"):
            raise self.error(f"ConstantOfShape of {value.dtype} at run time; supported: float, int64, int32, bool")
        return self.emit("ConstantOfShape", [shape], {"value": float(value), "dtype": kind}, outputs,
                         hint="ConstantOfShape")

    def op_Range(self, node: Any, ins: list, attrs: dict) -> list:
        start, limit, delta = (self.const_input(v, n) for v, n in zip(ins, ("start", "limit", "delta")))
        if delta == 0:
            raise self.error("Range with delta 0")
        n = max(int(np.ceil((limit - start) / delta)), 0)
        if n > MAX_ELEMENTS:
            raise self.error(f"Range of {n} elements")
        return [(start + delta * np.arange(n)).astype(np.result_type(start, limit, delta))]

    def op_Cast(self, node: Any, ins: list, attrs: dict) -> list:
        to = attrs.get("to")
        x = ins[0]
        if isinstance(x, _Sym) and not x.known and to in (_INT64, _INT32):
            return [x]  # sizes stay sizes
        if isinstance(x, np.ndarray) or (isinstance(x, _Sym) and x.known):
            if to not in _NUMPY:
                raise self.error(f"Cast to element type {to}")
            with np.errstate(all="ignore"):  # float to int truncates toward zero, as ONNX does
                return [self.materialize(x).astype(_NUMPY[to])]
        if to not in _VALUE_DTYPE:
            raise self.error(f"Cast to element type {to} at run time; supported: float, double, int64, int32, bool")
        return self.emit("Cast", [self.ref(x, "cast.in")], {"to": _VALUE_DTYPE[to]}, list(node.output),
                         hint=node.name or "Cast")

    # -- shape ops: parameters from inputs become attributes ---------------------------------------
    def op_Reshape(self, node: Any, ins: list, attrs: dict) -> list:
        x, shape = ins[0], ins[1]
        allowzero = attrs.get("allowzero", 0)
        if isinstance(shape, _Sym) and not shape.known:
            dims = self.resolve_dims(x, shape.dims, "Reshape")
            allowzero = 0
        else:
            dims = self.ints_input(shape, "shape")
        return self.run_or_fold(node, "Reshape", [x], {"shape": dims, "allowzero": allowzero})

    def resolve_dims(self, x: Any, dims: tuple, op: str) -> list[int]:
        """A target shape with run-time sizes as Reshape/Expand can take it: a size equal to x's own at the
        same axis becomes 0 ("copy", Reshape) or 1 ("keep", Expand); one other unknown becomes -1 (Reshape)."""
        xshape = self.shape_of(x) or []
        out = []
        unknown = 0
        for i, d in enumerate(dims):
            if isinstance(d, int):
                out.append(d)
            elif i < len(xshape) and xshape[i] == d:
                out.append(0 if op == "Reshape" else 1)
            elif op == "Reshape" and unknown == 0:
                out.append(-1)
                unknown += 1
            else:
                raise self.error(f"target shape {dims} depends on input sizes in a way lstm_engine cannot fold "
                                 f"(the input's shape is {xshape})")
        if op == "Reshape" and unknown and -1 in [d for d in dims if isinstance(d, int)]:
            raise self.error(f"target shape {dims} has both -1 and a size known only at run time")
        return out

    def op_Expand(self, node: Any, ins: list, attrs: dict) -> list:
        x, shape = ins
        if isinstance(shape, _Sym) and not shape.known:
            if isinstance(x, (np.ndarray, _Fill)) and self.materialize_scalar(x) is not None:
                return [_Fill(self.materialize_scalar(x), shape.dims)]
            dims = self.resolve_dims(x, shape.dims, "Expand")
        else:
            dims = self.ints_input(shape, "shape")
        return self.run_or_fold(node, "Expand", [x], {"shape": dims})

    @staticmethod
    def materialize_scalar(x: Any) -> np.ndarray | None:
        """The one value of a constant all of whose elements are equal, or None."""
        if isinstance(x, _Fill):
            return x.value
        if isinstance(x, np.ndarray) and x.size and (x == x.flat[0]).all():
            return x.reshape(-1)[:1].reshape(())
        return None

    def op_Tile(self, node: Any, ins: list, attrs: dict) -> list:
        return self.run_or_fold(node, "Tile", [ins[0]], {"repeats": self.ints_input(ins[1], "repeats")})

    def axes_from(self, ins: list, attrs: dict, index: int = 1, required: bool = False) -> list[int] | None:
        """Axes given as an attribute (older opsets) or as an input (newer ones)."""
        if "axes" in attrs:
            return list(attrs["axes"])
        if len(ins) > index and ins[index] is not None:
            return self.ints_input(ins[index], "axes")
        if required:
            raise self.error("axes are required")
        return None

    def op_Squeeze(self, node: Any, ins: list, attrs: dict) -> list:
        axes = self.axes_from(ins, attrs)
        x = ins[0]
        if isinstance(x, _Sym) and not x.known and (axes in ([0], [-1]) or axes is None) and len(x.dims) == 1:
            return [self.sym(x.dims, True, "Squeeze", [x], {"axes": [0]})]
        if axes is None:
            shape = self.shape_of(x)
            if shape is None or any(d is None or isinstance(d, str) for d in shape):
                raise self.error("Squeeze without axes of a tensor whose shape is known only at run time")
            axes = [i for i, d in enumerate(shape) if d == 1]
        return self.run_or_fold(node, "Squeeze", [x], {"axes": axes})

    def op_Unsqueeze(self, node: Any, ins: list, attrs: dict) -> list:
        axes = self.axes_from(ins, attrs, required=True)
        x = ins[0]
        if isinstance(x, _Sym) and not x.known and x.scalar and axes in ([0], [-1]):
            return [self.sym(x.dims, False, "Unsqueeze", [x], {"axes": [0]})]
        return self.run_or_fold(node, "Unsqueeze", [x], {"axes": axes})

    def op_Gather(self, node: Any, ins: list, attrs: dict) -> list:
        x, idx = ins
        axis = attrs.get("axis", 0)
        if isinstance(x, _Sym) and not x.known and not x.scalar and isinstance(idx, np.ndarray) and axis in (0, -1):
            n = len(x.dims)
            flat = [int(i) for i in idx.reshape(-1)]
            if any(not -n <= i < n for i in flat):
                raise self.error(f"index out of range for a shape of {n} sizes")
            if idx.ndim <= 1:
                return [self.sym([x.dims[i] for i in flat], idx.ndim == 0, "Gather", [x, idx], {"axis": 0})]
        return self.run_or_fold(node, "Gather", [x, idx], {"axis": axis})

    def op_Concat(self, node: Any, ins: list, attrs: dict) -> list:
        if any(isinstance(v, _Sym) and not v.known for v in ins) and all(
                isinstance(v, _Sym) or (isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype.kind in "iu")
                for v in ins):
            dims = []
            for v in ins:
                dims.extend(v.dims if isinstance(v, _Sym) else [int(d) for d in v])
            return [self.sym(dims, False, "Concat", ins, {"axis": 0})]
        return self.run_or_fold(node, "Concat", ins, {"axis": attrs.get("axis")})

    def op_Slice(self, node: Any, ins: list, attrs: dict) -> list:
        if self.opset < 10:
            params = {"starts": attrs.get("starts"), "ends": attrs.get("ends"), "axes": attrs.get("axes")}
        else:
            axes = self.ints_input(ins[3] if len(ins) > 3 else None, "axes", False)
            params = {"starts": self.slice_bounds(ins[0], ins[1], "starts", axes),
                      "ends": self.slice_bounds(ins[0], ins[2], "ends", axes), "axes": axes,
                      "steps": self.ints_input(ins[4] if len(ins) > 4 else None, "steps", False)}
        x = ins[0]
        if isinstance(x, _Sym) and not x.known and not x.scalar:
            index = np.arange(len(x.dims))
            sliced = self.fold("Slice", [index], params)[0]
            return [self.sym([x.dims[i] for i in sliced], False, "Slice", [x], params)]
        if isinstance(x, _Fill) and all(isinstance(d, int) for d in x.shape) is False:
            return [self.slice_fill(x, params)]
        return self.run_or_fold(node, "Slice", [x], params)

    def slice_bounds(self, x: Any, v: Any, what: str, axes: list[int] | None) -> list[int]:
        """Slice starts or ends; a bound written as the sliced axis's own run-time size plus k (x.size(1) - 1)
        is the same bound as k counted from the end (k < 0), or the end itself (k >= 0)."""
        if not (isinstance(v, _Sym) and not v.known):
            return self.ints_input(v, what)
        shape = self.shape_of(x) or []
        axes = list(range(len(v.dims))) if axes is None else axes
        out = []
        for d, a in zip(v.dims, axes):
            if isinstance(d, int):
                out.append(d)
                continue
            name, k = d if isinstance(d, tuple) else (d, 0)
            if not (-len(shape) <= a < len(shape) and shape[a] == name):
                raise self.error(f"input {what!r} depends on a size known only at run time ({name}) that is not "
                                 "the sliced axis's own")
            out.append(k if k < 0 else 1 << 62)
        return out

    def offset(self, node: Any, ins: list, sign: int) -> list | None:
        """size ± k as a _Sym of (name, k) entries, when one side is a run-time size and the other an integer
        constant; None otherwise."""
        a, b = ins
        if sign > 0 and isinstance(a, np.ndarray):
            a, b = b, a
        if not (isinstance(a, _Sym) and not a.known and isinstance(b, np.ndarray) and b.dtype.kind in "iu"
                and b.size == 1):
            return None
        k = sign * int(b.reshape(-1)[0])

        def shifted(d: Any) -> Any:
            if isinstance(d, int):
                return d + k
            name, j = d if isinstance(d, tuple) else (d, 0)
            return (name, j + k) if j + k else name
        return [self.sym([shifted(d) for d in a.dims], a.scalar, node.op_type, ins, {})]

    def op_Add(self, node: Any, ins: list, attrs: dict) -> list:
        return self.offset(node, ins, 1) or self.direct(node, ins, attrs)

    def op_Sub(self, node: Any, ins: list, attrs: dict) -> list:
        return self.offset(node, ins, -1) or self.direct(node, ins, attrs)

    def slice_fill(self, x: _Fill, params: dict) -> _Fill:
        """Slicing a filled tensor of run-time size: along known axes only (torch's zero initial states)."""
        shape = list(x.shape)
        axes = params.get("axes") or list(range(len(params["starts"])))
        steps = params.get("steps") or [1] * len(axes)
        for a, s, e, st in zip(axes, params["starts"], params["ends"], steps):
            a %= len(shape)
            if not isinstance(shape[a], int):
                raise self.error(f"Slice along an axis whose size is known only at run time ({shape[a]})")
            shape[a] = len(range(*slice(s, e, st).indices(shape[a])))
        return _Fill(x.value, tuple(shape))

    def op_Split(self, node: Any, ins: list, attrs: dict) -> list:
        split = attrs.get("split")
        if len(ins) > 1 and ins[1] is not None:
            split = self.ints_input(ins[1], "split")
        params = {"axis": attrs.get("axis", 0), "split": split}
        if "num_outputs" in attrs:
            params["num_outputs"] = attrs["num_outputs"]
        if isinstance(ins[0], (np.ndarray, _Sym)) and (not isinstance(ins[0], _Sym) or ins[0].known):
            return self.fold("Split", [self.materialize(ins[0])], params, len(node.output))
        return self.emit("Split", [self.ref(ins[0], "split.in")], params, list(node.output), hint=node.name or "Split")

    def op_Pad(self, node: Any, ins: list, attrs: dict) -> list:
        mode = attrs.get("mode", "constant")
        if mode not in ("constant", "reflect", "edge"):
            raise self.error(f"Pad mode {mode!r}; supported: constant, reflect, edge")
        if self.opset < 11:
            params = {"pads": list(attrs.get("pads", [])), "mode": mode, "value": float(attrs.get("value", 0.0))}
        else:
            value = self.const_input(ins[2], "constant_value", False) if len(ins) > 2 else None
            params = {"pads": self.ints_input(ins[1], "pads"), "mode": mode,
                      "value": 0.0 if value is None or value.size == 0 else float(value.reshape(-1)[0]),
                      "axes": self.ints_input(ins[3] if len(ins) > 3 else None, "axes", False)}
        return self.run_or_fold(node, "Pad", [ins[0]], params)

    def op_Clip(self, node: Any, ins: list, attrs: dict) -> list:
        if self.opset < 11:
            lo, hi = attrs.get("min"), attrs.get("max")
        else:
            lo_a = self.const_input(ins[1], "min", False) if len(ins) > 1 else None
            hi_a = self.const_input(ins[2], "max", False) if len(ins) > 2 else None
            lo = None if lo_a is None else float(lo_a.reshape(-1)[0])
            hi = None if hi_a is None else float(hi_a.reshape(-1)[0])
        return self.run_or_fold(node, "Clip", [ins[0]], {"min": lo, "max": hi})

    def reduce(self, node: Any, ins: list, attrs: dict, op: str, axes_input_from: int) -> list:
        if self.opset >= axes_input_from:
            axes = self.ints_input(ins[1] if len(ins) > 1 else None, "axes", False)
        else:
            axes = attrs.get("axes")
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return [ins[0]]
            axes = None
        return self.run_or_fold(node, op, [ins[0]], {"axes": axes, "keepdims": attrs.get("keepdims", 1)})

    def op_ReduceSum(self, node: Any, ins: list, attrs: dict) -> list:
        return self.reduce(node, ins, attrs, "ReduceSum", 13)

    def op_ReduceMean(self, node: Any, ins: list, attrs: dict) -> list:
        return self.reduce(node, ins, attrs, "ReduceMean", 18)

    def op_ReduceMax(self, node: Any, ins: list, attrs: dict) -> list:
        return self.reduce(node, ins, attrs, "ReduceMax", 18)

    def op_ReduceMin(self, node: Any, ins: list, attrs: dict) -> list:
        return self.reduce(node, ins, attrs, "ReduceMin", 18)

    def op_ReduceL2(self, node: Any, ins: list, attrs: dict) -> list:
        return self.reduce(node, ins, attrs, "ReduceL2", 18)

    def softmax(self, node: Any, ins: list, attrs: dict, op: str) -> list:
        axis = attrs.get("axis", -1 if self.opset >= 13 else 1)
        if self.opset < 13:
            # Before opset 13 Softmax flattened to 2-D at `axis`: the same as ours only on the last axis.
            rank = self.rank_of(ins[0])
            if rank is None or axis % rank != rank - 1:
                raise self.error(f"{op} (opset {self.opset}) over axis {axis} of a tensor of rank {rank}: the "
                                 "old flattening semantics are supported only on the last axis")
            axis = -1
        return self.run_or_fold(node, op, [ins[0]], {"axis": axis})

    def op_Softmax(self, node: Any, ins: list, attrs: dict) -> list:
        return self.softmax(node, ins, attrs, "Softmax")

    def op_LogSoftmax(self, node: Any, ins: list, attrs: dict) -> list:
        return self.softmax(node, ins, attrs, "LogSoftmax")

    def op_LayerNormalization(self, node: Any, ins: list, attrs: dict) -> list:
        if any(node.output[1:]):
            raise self.error("LayerNormalization's Mean and InvStdDev outputs are used; only Y is supported")
        params = {"axis": attrs.get("axis", -1), "epsilon": attrs.get("epsilon", 1e-5)}
        return self.run_or_fold(node, "LayerNormalization", ins[:3], params)[:1]

    def op_BatchNormalization(self, node: Any, ins: list, attrs: dict) -> list:
        if attrs.get("training_mode", 0) or any(node.output[1:]):
            raise self.error("BatchNormalization in training mode; lstm_engine runs inference only")
        if attrs.get("spatial", 1) == 0:
            raise self.error("BatchNormalization with spatial=0 (statistics per element, opset 7/8)")
        return self.run_or_fold(node, "BatchNormalization", ins[:5], {"epsilon": attrs.get("epsilon", 1e-5)})[:1]

    def op_Conv(self, node: Any, ins: list, attrs: dict) -> list:
        w = self.const_input(ins[1], "W")
        if w.ndim != 3:
            raise self.error(f"Conv with a {w.ndim - 2}-D kernel {w.shape}; lstm_engine runs 1-D convolution")
        pads = attrs.get("pads")
        auto = attrs.get("auto_pad", "NOTSET")
        if auto == "VALID":
            pads = [0, 0]
        elif auto != "NOTSET":
            span = (attrs.get("dilations") or [1])[0] * (w.shape[2] - 1) + 1
            if (attrs.get("strides") or [1])[0] != 1:
                raise self.error(f"Conv auto_pad={auto} with a stride; supported with stride 1 only")
            total = span - 1
            lo = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads = [lo, total - lo]
        params = {k: attrs[k] for k in ("kernel_shape", "strides", "dilations", "group") if k in attrs}
        params["pads"] = pads
        return self.run_or_fold(node, "Conv", ins[:3], params)

    # -- operators written with the ones above -------------------------------------------------------
    def chain(self, node: Any, steps: list) -> list:
        """Emit (op, inputs, attrs) steps, each reading the values before it ("$k" is step k's output); the
        last writes the node's output. Folds when every input is known at load."""
        values: list = []
        for k, (op, ins, attrs) in enumerate(steps):
            args = [values[int(v[1:])] if isinstance(v, str) else v for v in ins]
            last = k == len(steps) - 1
            fake = type("N", (), {"output": [node.output[0] if last else self.fresh(f"{node.name or op}.{k}")],
                                  "name": node.name})
            values.append(self.run_or_fold(fake, op, args, attrs)[0])
        return [values[-1]]

    def op_Sum(self, node: Any, ins: list, attrs: dict) -> list:
        return self.chain(node, [("Add", [ins[0] if k == 0 else f"${k - 1}", v], {}) for k, v in enumerate(ins[1:])]
                          or [("Identity", [ins[0]], {})])

    def op_Mean(self, node: Any, ins: list, attrs: dict) -> list:
        steps = [("Add", [ins[0] if k == 0 else f"${k - 1}", v], {}) for k, v in enumerate(ins[1:])]
        total = f"${len(steps) - 1}" if steps else ins[0]
        return self.chain(node, steps + [("Div", [total, np.array(len(ins), np.float32)], {})])

    def op_PRelu(self, node: Any, ins: list, attrs: dict) -> list:
        x, slope = ins
        return self.chain(node, [("Mul", [x, slope], {}), ("Less", [x, np.array(0, np.float32)], {}),
                                 ("Where", ["$1", "$0", x], {})])

    def op_Selu(self, node: Any, ins: list, attrs: dict) -> list:
        alpha, gamma = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
        return self.chain(node, [("Elu", [ins[0]], {"alpha": alpha}), ("Mul", ["$0", np.array(gamma, np.float32)], {})])

    def op_HardSwish(self, node: Any, ins: list, attrs: dict) -> list:
        return self.chain(node, [("HardSigmoid", [ins[0]], {"alpha": 1 / 6, "beta": 0.5}), ("Mul", [ins[0], "$0"], {})])

    def global_pool(self, node: Any, ins: list, op: str) -> list:
        rank = self.rank_of(ins[0])
        if rank is None or rank < 3:
            raise self.error(f"{node.op_type} of a tensor of rank {rank}; expected (N, C, spatial...)")
        return self.run_or_fold(node, op, ins, {"axes": list(range(2, rank)), "keepdims": 1})

    def op_GlobalAveragePool(self, node: Any, ins: list, attrs: dict) -> list:
        return self.global_pool(node, ins, "ReduceMean")

    def op_GlobalMaxPool(self, node: Any, ins: list, attrs: dict) -> list:
        return self.global_pool(node, ins, "ReduceMax")

    def op_Flatten(self, node: Any, ins: list, attrs: dict) -> list:
        return self.run_or_fold(node, "Flatten", ins, {"axis": attrs.get("axis", 1)})

    # -- control flow -------------------------------------------------------------------------------
    def op_If(self, node: Any, ins: list, attrs: dict) -> list:
        cond = ins[0]
        if not isinstance(cond, _Run):
            c = self.materialize(cond)
            if c.size != 1:
                raise self.error(f"If's condition has {c.size} elements")
            branch = attrs["then_branch"] if bool(c.reshape(-1)[0]) else attrs["else_branch"]
            return self.inline(branch)
        graphs = []
        for key in ("then_branch", "else_branch"):
            sub = _Converter(self.source, self.opset, self.inferred, self.float_dtype, self, _Scope(parent=self.scope))
            sub.read_branch(attrs[key])
            sub.where = self.where
            outs = sub._outputs_for_branch([o.name for o in attrs[key].output])
            graphs.append(Graph([], outs, sub.nodes, sub.constants, sub.layers, None, {}))
            self.where = f"ONNX node {node.name!r} ({node.op_type})"
        if len(graphs[0].outputs) != len(node.output) or len(graphs[1].outputs) != len(node.output):
            raise self.error("If's branches give a different number of outputs than the node")
        return self.emit("If", [self.ref(cond, "if.cond")], {"then_branch": graphs[0], "else_branch": graphs[1]},
                         list(node.output), hint=node.name or "If")

    def inline(self, branch: Any) -> list:
        """The values of a branch run in this graph (an If whose condition is known at load)."""
        where = self.where
        self.read_branch(branch)
        self.where = where
        return [self.scope.get(o.name) for o in branch.output]

    def read_branch(self, g: Any) -> None:
        """A sub-graph's initializers and nodes into this converter's scope."""
        if len(g.input):
            raise self.error(f"sub-graph {g.name!r} takes inputs (a Loop or Scan body); If branches take none")
        for t in g.initializer:
            self.scope.values[t.name] = self.tensor(t, f"initializer {t.name!r} of sub-graph {g.name!r}")
        for n in g.node:
            self.convert(n)

    def _outputs_for_branch(self, names: list[str]) -> list[str]:
        """A branch's outputs as fresh names of this branch (the outer graph names the If's outputs)."""
        out = []
        for name in names:
            v = self.scope.get(name)
            if v is None:
                raise self.error(f"an If branch output {name!r} is computed by no node")
            fresh = self.fresh(f"{name}.branch")
            if isinstance(v, _Run):
                self.nodes.append(Node("Identity", [v.name], [fresh], {}, self.fresh(f"{fresh}.node", self.node_names),
                                       f"{self.source}: {self.where}"))
            else:
                self.constants[fresh] = self.materialize(v)
            out.append(fresh)
        return out

    # -- recurrent operators ------------------------------------------------------------------------
    def op_LSTM(self, node: Any, ins: list, attrs: dict) -> list:
        return self.recurrent(node, ins, attrs, LSTM, 4, _LSTM_ORDER, 3)

    def op_GRU(self, node: Any, ins: list, attrs: dict) -> list:
        return self.recurrent(node, ins, attrs, GRU, 3, _GRU_ORDER, 2)

    def op_RNN(self, node: Any, ins: list, attrs: dict) -> list:
        return self.recurrent(node, ins, attrs, RNN, 1, [0], 1)

    def recurrent(self, node: Any, ins: list, attrs: dict, cls: type, G: int, order: list, n_act: int) -> list:
        ins = ins + [None] * (8 - len(ins))
        x, W, R, B, lens, h0, c0, P = ins[:8]
        direction = attrs.get("direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            raise self.error(f"direction {direction!r}; expected forward, reverse or bidirectional")
        D = 2 if direction == "bidirectional" else 1
        layout = attrs.get("layout", 0)
        if layout not in (0, 1):
            raise self.error(f"layout {layout}; expected 0 or 1")
        w = self.weight(W, "W", 3)
        r = self.weight(R, "R", 3)
        if w.shape[0] != D or r.shape[0] != D:
            raise self.error(f"W {w.shape} and R {r.shape} must have {D} direction(s) for direction={direction!r}")
        H = r.shape[2]
        if H == 0 or w.shape[1] != G * H or r.shape[1] != G * H or w.shape[2] == 0:
            raise self.error(f"W {w.shape} and R {r.shape} do not fit {G} gates of hidden size {H}")
        if "hidden_size" in attrs and attrs["hidden_size"] != H:
            raise self.error(f"hidden_size={attrs['hidden_size']} but R {r.shape} gives {H}")
        I = w.shape[2]

        def gates(a: np.ndarray) -> np.ndarray:  # (D, G*H, ...) from ONNX's gate order to the engine's
            return a.reshape((D, G, H) + a.shape[2:])[:, order].reshape(a.shape)

        kwargs: dict[str, Any] = {"dtype": self.float_dtype}
        if B is not None:
            b = self.weight(B, "B", 2)
            if b.shape != (D, 2 * G * H):
                raise self.error(f"B has shape {b.shape}, expected {(D, 2 * G * H)}")
            kwargs["bias_ih"], kwargs["bias_hh"] = gates(b[:, :G * H]), gates(b[:, G * H:])
        if P is not None:
            if cls is not LSTM:
                raise self.error("P (peepholes) exists only for LSTM")
            p = self.weight(P, "P", 2)
            if p.shape != (D, 3 * H):
                raise self.error(f"P has shape {p.shape}, expected {(D, 3 * H)}")
            kwargs["peephole"] = p.reshape(D, 3, H)[:, _PEEPHOLE_ORDER].reshape(D, 3 * H)
        if "clip" in attrs:
            clip = float(attrs["clip"])
            if not clip > 0:
                raise self.error(f"clip={clip}; expected a positive bound")
            kwargs["clip"] = clip
        funcs = self.activations(attrs, n_act, D)
        if cls is LSTM:
            kwargs["recurrent_activation"], kwargs["activation"], kwargs["cell_activation"] = funcs
            kwargs["input_forget"] = bool(attrs.get("input_forget", 0))
        elif cls is GRU:
            kwargs["recurrent_activation"], kwargs["activation"] = funcs
            lbr = attrs.get("linear_before_reset", 0)
            if lbr not in (0, 1):
                raise self.error(f"linear_before_reset={lbr}; expected 0 or 1")
            kwargs["reset_after"] = bool(lbr)
        else:
            kwargs["nonlinearity"] = funcs[0]
        if direction == "reverse":
            kwargs["go_backwards"] = True
        if cls is not LSTM and attrs.get("input_forget"):
            raise self.error("input_forget exists only for LSTM")
        try:
            layer = cls(gates(w), gates(r), **kwargs)
        except (ValueError, TypeError) as exc:
            raise self.error(str(exc)) from None
        k = len(self.layers)
        self.layers.append(layer)
        base = node.name or cls.__name__

        # Inputs: batch-major x, lengths, states (D, B, H).
        if isinstance(x, _Run) or isinstance(x, np.ndarray):
            xs = self.shape_of(x)
            if xs is not None and (len(xs) != 3 or (isinstance(xs[2], int) and xs[2] != I)):
                raise self.error(f"X has shape {xs}, expected 3-D with {I} features")
        x_name = self.ref(x, f"{base}.X")
        if layout == 0:
            x_name = self.emit("Transpose", [x_name], {"perm": [1, 0, 2]}, hint=f"{base}.batch_first")[0].name
        lens_name = ""
        if lens is not None:
            lens_name = self.ref(lens, f"{base}.sequence_lens")
        states = []
        for v, what in ((h0, "initial_h"), (c0, "initial_c")):
            if what == "initial_c" and cls is not LSTM:
                break
            if v is None or (self.materialize_scalar(v) is not None and not self.materialize_scalar(v).any()):
                states.append("")  # zeros: the engine's default
                continue
            name = self.ref(v, f"{base}.{what}")
            if layout == 1:
                name = self.emit("Transpose", [name], {"perm": [1, 0, 2]}, hint=f"{base}.{what}.direction_first")[0].name
            states.append(name)
        outs = list(node.output) + [""] * (3 - len(node.output))
        Y, Y_h, Y_c = outs[:3]
        y_b = self.fresh(f"{base}.y") if Y else ""
        h_n = Y_h if Y_h and layout == 0 else (self.fresh(f"{base}.h_n") if Y_h else "")
        c_n = Y_c if Y_c and layout == 0 else (self.fresh(f"{base}.c_n") if Y_c else "")
        rec_out = [y_b or self.fresh(f"{base}.y"), h_n or self.fresh(f"{base}.h_n")]
        if cls is LSTM:
            rec_out.append(c_n or self.fresh(f"{base}.c_n"))
        self.emit("Recurrent", [x_name, lens_name] + states, {"layer": k}, rec_out, hint=base)
        results: list = [None, None, None]
        if Y:
            y_name = rec_out[0]
            if direction == "reverse":
                # The layer runs backwards as Keras's go_backwards does, which returns its outputs in running
                # order; ONNX keeps each at its own step: flip them back (sessions refuse go_backwards layers).
                y_name = self.emit("Slice", [y_name], {"starts": [-1], "ends": [-(1 << 62)], "axes": [1],
                                                       "steps": [-1]}, hint=f"{base}.own_steps")[0].name
            y4 = self.emit("Reshape", [y_name], {"shape": [0, 0, D, H], "allowzero": 0},
                           outputs=[self.fresh(f"{base}.y4")] if layout == 0 else [Y], hint=f"{base}.split_directions")
            if layout == 0:
                self.emit("Transpose", [y4[0].name], {"perm": [1, 2, 0, 3]}, [Y], hint=f"{base}.time_first")
            results[0] = _Run(Y)
        for i, (want, got) in enumerate(((Y_h, h_n), (Y_c, c_n)), 1):
            if not want:
                continue
            if layout == 1:
                self.emit("Transpose", [got], {"perm": [1, 0, 2]}, [want], hint=f"{base}.batch_first_state")
            results[i] = _Run(want)
        return results[:len(node.output)]

    def weight(self, v: Any, what: str, ndim: int) -> np.ndarray:
        a = self.const_input(v, what)
        if a.dtype.kind != "f" or a.ndim != ndim:
            raise self.error(f"{what} must be a {ndim}-D float tensor, got {a.dtype} {a.shape}")
        return a

    def activations(self, attrs: dict, n: int, D: int) -> list[list]:
        """Per role (f, g[, h]) a per-direction list of engine activation specs, from activations/alpha/beta."""
        names = attrs.get("activations")
        defaults = ["Sigmoid", "Tanh", "Tanh"][:n] if n > 1 else ["Tanh"]
        if not names:
            names = defaults * D
        if len(names) != n * D:
            raise self.error(f"activations {names}: expected {n} per direction, {n * D} in all (onnxruntime "
                             "refuses other counts too)")
        alphas = list(attrs.get("activation_alpha", []))
        betas = list(attrs.get("activation_beta", []))
        specs = []
        for name in names:
            key = str(name).lower()
            if key not in _ACTIVATIONS:
                raise self.error(f"activation {name!r}; supported: Relu, Tanh, Sigmoid, Affine, LeakyRelu, "
                                 "ThresholdedRelu, ScaledTanh, HardSigmoid, Elu, Softsign, Softplus")
            engine, defaults_ab = _ACTIVATIONS[key]
            params = {}
            for pname, default, source in zip(("alpha", "beta"), defaults_ab, (alphas, betas)):
                if source:
                    params[pname] = float(source.pop(0))
                elif default is None:
                    raise self.error(f"activation {name!r} without activation_{pname}: onnxruntime takes 0 "
                                     "there and the ONNX spec the old operator's default; give it explicitly")
                else:
                    params[pname] = default
            specs.append({"name": engine, **params} if params else engine)
        return [[specs[d * n + role] for d in range(D)] for role in range(n)]
