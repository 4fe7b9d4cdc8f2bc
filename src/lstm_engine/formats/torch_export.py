"""PyTorch modules read through ``torch.export``: the real forward, mapped op by op to the engine's graph.

``torch.py`` reads weights and never imports torch; this module needs torch (it runs the export) and is
imported only by ``from_torch(module, example_input)``.

How it reads a module:
- Every ``nn.LSTM``/``nn.GRU``/``nn.RNN`` inside is traced as one opaque op, ``lstm_engine::recurrent``
  (registered here, with torch's own functions as its implementation), instead of torch's own lowering,
  which unrolls the time loop and fixes the number of steps. Everything else is torch's ATen graph.
- Every axis of every input is exported as dynamic (``Dim.AUTO``): the graph holds for other batch
  sizes and lengths, except where the forward itself fixes a size (then that axis is a fixed int in the
  graph's inputs) or bounds it (a Python branch on ``x.shape``, a slice ``x[:, :10]``): those bounds go
  to ``graph.metadata["dim_ranges"]`` and are checked at every call.
- In-place ops are made functional (``run_decompositions({})``), subgraphs of constants are folded with
  torch once, and each remaining ATen op maps to ONNX-named graph ops (``_HANDLERS``). Any other op
  raises ``UnsupportedOpError`` naming the ATen op, the module path and the user's source line.
"""
from __future__ import annotations

import operator
import os
import traceback
from typing import Any, Callable

import numpy as np
import sympy
import torch
from torch.utils._sympy.numbers import int_oo

from ..errors import LoadError, UnsupportedOpError
from ..graph import Graph, Node, ValueInfo
from .torch import recurrent_layers_from_state_dict

INT64_MAX = 2**63 - 1
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_ENGINE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_RNN_CLASSES = (torch.nn.LSTM, torch.nn.GRU, torch.nn.RNN)
_MODES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


# -- the recurrent op torch traces in place of an nn.LSTM/GRU/RNN call ------------------------------

def _state_sizes(weights: list, mode: str) -> tuple[int, int]:
    """(hidden_size, output width P) from the first layer's weight_hh (G*H, P)."""
    w_hh = weights[1]
    return w_hh.shape[0] // _MODES[mode], w_hh.shape[1]


@torch.library.custom_op("lstm_engine::recurrent", mutates_args=())
def recurrent(x: torch.Tensor, h0: torch.Tensor | None, c0: torch.Tensor | None, weights: list[torch.Tensor],
              mode: str, num_layers: int, bidirectional: bool, batch_first: bool,
              has_biases: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An nn.LSTM/GRU/RNN call, computed by torch's own functions: (out, h_n, c_n or an empty tensor)."""
    D = 2 if bidirectional else 1
    B = x.shape[0 if batch_first else 1]
    H, P = _state_sizes(weights, mode)
    if h0 is None:
        h0 = x.new_zeros(num_layers * D, B, P)
    args = (has_biases, num_layers, 0.0, False, bidirectional, batch_first)
    if mode == "LSTM":
        c0 = x.new_zeros(num_layers * D, B, H) if c0 is None else c0
        y, h, c = torch.lstm(x, (h0, c0), weights, *args)
        return y, h, c
    fn = {"GRU": torch.gru, "RNN_TANH": torch.rnn_tanh, "RNN_RELU": torch.rnn_relu}[mode]
    y, h = fn(x, h0, weights, *args)
    return y, h, x.new_empty(0)


@recurrent.register_fake
def _recurrent_shapes(x, h0, c0, weights, mode, num_layers, bidirectional, batch_first, has_biases):
    D = 2 if bidirectional else 1
    H, P = _state_sizes(weights, mode)
    torch._check(x.shape[2] == weights[0].shape[1])  # the input width is fixed by weight_ih_l0
    B, T = (x.shape[0], x.shape[1]) if batch_first else (x.shape[1], x.shape[0])
    y = x.new_empty((B, T, D * P) if batch_first else (T, B, D * P))
    c = x.new_empty((num_layers * D, B, H)) if mode == "LSTM" else x.new_empty(0)
    return y, x.new_empty((num_layers * D, B, P)), c


def _traced_rnn_forward(module: torch.nn.Module, path: str) -> Callable:
    """A forward for ``module`` that calls ``lstm_engine::recurrent`` (installed only during the export)."""

    def forward(input, hx=None):
        if isinstance(input, torch.nn.utils.rnn.PackedSequence):
            raise UnsupportedOpError("torch.nn.utils.rnn.pack_padded_sequence", _caller(path, module),
                                     ["padded (B, T, F) tensors; pass lengths= to the engine's forward instead"])
        batched = input.dim() == 3
        if not batched:  # as nn.LSTM does: one sequence, states without the batch axis
            input = input.unsqueeze(0 if module.batch_first else 1)
            if hx is not None:
                hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
        h0, c0 = hx if isinstance(hx, tuple) else (hx, None)
        weights = [getattr(module, name) for name in module._flat_weights_names]
        y, h, c = torch.ops.lstm_engine.recurrent(input, h0, c0, weights, module.mode, module.num_layers,
                                                  module.bidirectional, module.batch_first, module.bias)
        if not batched:
            y, h = y.squeeze(0 if module.batch_first else 1), h.squeeze(1)
            c = c.squeeze(1) if module.mode == "LSTM" else c
        return y, ((h, c) if module.mode == "LSTM" else h)

    return forward


def _caller(path: str, module: Any) -> str:
    """Where the user's code called ``module``: its path and the innermost user frame."""
    frames = [f for f in traceback.extract_stack() if not _is_library_file(f.filename)]
    where = f"{path or '<root>'} ({type(module).__name__})"
    return f"{where} at {frames[-1].filename}:{frames[-1].lineno}" if frames else where


def _is_library_file(filename: str) -> bool:
    return filename.startswith((_TORCH_DIR, _ENGINE_DIR)) or filename.startswith("<")


# -- entry point -------------------------------------------------------------------------------------

def export_graph(module: torch.nn.Module, example_input: Any, *, dtype: Any = np.float32) -> Graph:
    """The graph of ``module``'s forward on inputs shaped like ``example_input`` (a tensor, an array or a
    tuple of them, one per forward argument)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch: expected an nn.Module, got {type(module).__name__}")
    training = [name or type(module).__name__ for name, m in module.named_modules() if m.training]
    if training:
        raise ValueError(f"from_torch: {type(module).__name__} is in training mode ({training[0]!r}); call "
                         "module.eval() first — lstm_engine runs inference: Dropout off, BatchNorm with its "
                         "running statistics")
    args = _example_args(example_input)
    # Only torch's own forward is replaced: a subclass that overrides it is traced as written.
    rnns = {name: m for name, m in module.named_modules()
            if isinstance(m, _RNN_CLASSES) and type(m).forward in {c.forward for c in _RNN_CLASSES}}
    own = {name: m.__dict__["forward"] for name, m in rnns.items() if "forward" in m.__dict__}
    if own:
        raise LoadError(f"from_torch: {next(iter(own))!r} has a forward of its own (set on the instance); "
                        "lstm_engine maps the forward of nn.LSTM/GRU/RNN itself")
    for name, m in rnns.items():
        m.forward = _traced_rnn_forward(m, name)
    try:
        dynamic = tuple({axis: torch.export.Dim.AUTO for axis in range(a.dim())} for a in args)
        with torch.no_grad():
            program = torch.export.export(module, args, dynamic_shapes=dynamic, strict=False)
            program = program.run_decompositions({})  # in-place ops become functional ones
    except UnsupportedOpError:
        raise
    except Exception as exc:  # torch raises many kinds; all mean "this forward cannot be read"
        raise LoadError(f"from_torch: torch.export cannot read {type(module).__name__}.forward: "
                        f"{_export_error(exc)}") from exc
    finally:
        for m in rnns.values():
            del m.forward
    return _Converter(program, type(module).__name__, dtype).run()


def _example_args(example_input: Any) -> tuple:
    items = example_input if isinstance(example_input, (tuple, list)) else (example_input,)
    out = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(np.ascontiguousarray(item))
        if not isinstance(item, torch.Tensor):
            raise TypeError(f"from_torch: example_input[{i}] is a {type(item).__name__}; expected a torch "
                            "tensor or a NumPy array (a tuple of them for several forward arguments)")
        out.append(item)
    if not out:
        raise ValueError("from_torch: example_input is empty")
    return tuple(out)


def _export_error(exc: Exception) -> str:
    """torch's message cut to what names the cause and the user's line."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    head = lines[0] if lines else type(exc).__name__
    user = [i for i, line in enumerate(lines) if line.strip().startswith("File ")
            and not _is_library_file(line.strip().split('"')[1] if '"' in line else "")]
    if user:
        i = user[-1]
        head += f" — {lines[i].strip()}" + (f": {lines[i + 1].strip()}" if i + 1 < len(lines) else "")
    return head


# -- the truth for `lstm-engine verify` ---------------------------------------------------------------

def load_reference(path: str) -> tuple[Callable, list | None]:
    """The torch module a model was read from, to check the model against: ``(call, shapes)``.

    ``path`` is a Python script that defines ``model`` (an nn.Module with its weights, or a function
    returning one), or a program saved with ``torch.export.save`` (``.pt2``), which runs only at the
    input shapes it was exported for: ``shapes`` lists them (None for a script). LoadError if neither.
    """
    import runpy

    from . import detect

    if path.endswith(".py"):
        try:
            namespace = runpy.run_path(path, run_name="__lstm_engine_verify__")
        except Exception as exc:  # the user's script: any failure is reported, with its kind
            raise LoadError(f"{path}: the script failed: {type(exc).__name__}: {exc}") from exc
        module = namespace.get("model")
        if callable(module) and not isinstance(module, torch.nn.Module):
            module = module()
        if not isinstance(module, torch.nn.Module):
            raise LoadError(f"{path}: expected the script to define `model`, an nn.Module (or a function "
                            "returning one)")
        module.eval()

        def call(*inputs):
            with torch.no_grad():
                return module(*inputs)
        return call, None
    if detect(path) == "torch-export":
        try:
            program = torch.export.load(path)
        except Exception as exc:  # torch raises many kinds for a file it cannot read
            raise LoadError(f"{path}: torch.export.load cannot read it: {exc}") from exc
        users = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        vals = {n.name: n.meta["val"] for n in program.graph.nodes if n.op == "placeholder"}
        shapes = [[_dim_hint(d) for d in vals[name].shape] for name in users]
        runner = program.module()

        def call(*inputs):
            with torch.no_grad():
                return runner(*inputs)
        return call, shapes
    raise LoadError(f"{path}: expected a Python script defining `model` (.py) or a program saved with "
                    "torch.export.save (.pt2); a state_dict does not say what the forward computes")


# -- the converter ----------------------------------------------------------------------------------

class _Value(str):
    """The name of a value of the graph being built (plain strings are literal arguments)."""


class _Zeros:
    """A zero tensor whose shape depends on the input: only an RNN's initial state may be one."""

    def __init__(self, node: Any) -> None:
        self.node = node


class _Converter:
    def __init__(self, program: Any, root: str, dtype: Any) -> None:
        self.program = program
        self.root = root
        self.dtype = dtype
        self.nodes: list[Node] = []
        self.constants: dict[str, np.ndarray] = {}
        self.layers: list = []
        self.env: dict[str, Any] = {}
        self.names: set[str] = set()
        self.dim_names: dict[Any, str] = {}  # sympy symbol -> the name it has in the graph's inputs
        self.min_two: set[Any] = set()  # symbols whose size-1 case torch computes differently
        self.node: Any = None  # the fx node being mapped, for sources and errors
        self.param_names: dict[int, str] = {}  # id(tensor) -> its state_dict name, to name constants
        self.cells: dict[tuple, int] = {}  # an nn.*Cell's weights -> its layer's index

    # -- helpers -------------------------------------------------------------------------------
    def fresh(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def source(self, node: Any = None) -> str:
        node = node if node is not None else self.node
        stack = node.meta.get("nn_module_stack") or {}
        path, kind = next(reversed(stack.values()), ("", self.root)) if stack else ("", self.root)
        kind = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else getattr(kind, "__name__", str(kind))
        where = f"{path or '<root>'} ({kind})"
        frames = []
        for line in (node.meta.get("stack_trace") or "").splitlines():
            line = line.strip()
            if line.startswith("File ") and '"' in line:
                frames.append([line.split('"')[1], line, ""])
            elif frames and not frames[-1][2]:
                frames[-1][2] = line
        user = [f for f in frames if not _is_library_file(f[0])]
        if user:
            filename, line, code = user[-1]
            lineno = line.split("line ", 1)[1].split(",", 1)[0] if "line " in line else "?"
            where += f" at {filename}:{lineno}" + (f": {code}" if code else "")
        return where

    def refuse(self, op: str, why: str = "") -> UnsupportedOpError:
        err = UnsupportedOpError(op, self.source(), supported_ops())
        if why:
            err.args = (f"{self.source()}: op {op!r} {why}; supported ops: {', '.join(err.supported)}",)
        return err

    def emit(self, op: str, inputs: list, attrs: dict | None = None, outputs: int | list = 1,
             name: str = "") -> Any:
        """Add a node; inputs are value names or constants. Returns its output name (or names).

        Values are named after the torch node (or ``name.<output>`` for outputs given as a list of names).
        """
        names = [self.value(v) for v in inputs]
        base = name or (self.node.name if self.node is not None else op.lower())
        suffixes = outputs if isinstance(outputs, list) else [""] * outputs
        outs = [_Value(self.fresh(f"{base}.{s}" if s else base)) for s in suffixes]
        node_name = self.fresh(base if name else f"{op}_{base}")
        self.nodes.append(Node(op, names, outs, dict(attrs or {}), node_name, self.source()))
        return outs[0] if len(outs) == 1 else outs

    def module_path(self, node: Any) -> str:
        """The path of the module an fx node ran in ("" for the root)."""
        stack = node.meta.get("nn_module_stack") or {}
        return next(reversed(stack.values()))[0] if stack else ""

    def value(self, v: Any, name: str = "") -> str:
        """The graph value for an input: a name stays, a tensor, array or number becomes a constant (named
        ``name``, or after the parameter it is)."""
        if isinstance(v, _Value):
            return v
        if v is None or (isinstance(v, str) and not v):  # an omitted optional input
            return ""
        if isinstance(v, _Zeros):
            raise self.refuse(str(v.node.target), "(a tensor whose shape depends on the input) is only "
                              "supported as an RNN's initial state")
        if isinstance(v, torch.Tensor):
            arr = _array(v)
        elif isinstance(v, (bool, int, float)):
            arr = np.array(v, dtype=np.bool_ if isinstance(v, bool) else np.float64 if isinstance(v, float)
                           else np.int64)
        elif isinstance(v, np.ndarray):
            arr = v
        else:
            raise self.refuse(str(self.node.target), f"takes an argument of type {type(v).__name__}")
        name = self.fresh(name or self.param_names.get(id(v))
                          or f"const_{self.node.name if self.node is not None else 'c'}")
        self.constants[name] = np.array(arr, order="C")  # ascontiguousarray would make 0-d arrays 1-d
        return _Value(name)

    def meta(self, arg: Any) -> Any:
        """The fake tensor torch recorded for an fx node argument."""
        return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None

    def rank(self, arg: Any) -> int:
        return self.meta(arg).dim()

    def kind(self, arg: Any) -> str:
        val = self.meta(arg)
        if val is None:
            return "float" if isinstance(arg, float) else "int64"
        return _value_dtype(val.dtype)

    def dims(self, arg: Any) -> list:
        """Each dim of an fx node's value: an int, or the sympy expression of a dynamic size."""
        return [_dim(d) for d in self.meta(arg).shape]

    # -- the walk ------------------------------------------------------------------------------
    def run(self) -> Graph:
        program = self.program
        signature = program.graph_signature
        mutated = dict(signature.buffers_to_mutate) | dict(signature.user_inputs_to_mutate)
        if mutated:
            raise LoadError(f"from_torch: {self.root}.forward writes into {sorted(mutated.values())[0]!r} "
                            "(an input or a buffer); lstm_engine runs forwards that do not mutate their inputs")
        params = {}
        for spec in signature.input_specs:
            if spec.kind.name in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
                params[spec.arg.name] = (program.state_dict[spec.target] if spec.target in program.state_dict
                                         else program.constants[spec.target])
                self.param_names[id(params[spec.arg.name])] = spec.target
        graph = program.graph
        self.name_dims(graph)
        inputs, examples = [], {}
        for node in graph.nodes:
            self.node = node
            if node.op == "placeholder":
                if node.name in params:
                    self.env[node.name] = params[node.name]
                else:
                    val = node.meta["val"]
                    if not isinstance(val, torch.Tensor):
                        raise LoadError(f"from_torch: forward argument {node.name!r} is a {type(val).__name__}; "
                                        "only tensor arguments are supported")
                    self.names.add(node.name)
                    inputs.append(ValueInfo(node.name, _value_dtype(val.dtype),
                                            [self.dim_name(_dim(d)) for d in val.shape]))
                    self.env[node.name] = _Value(node.name)
                    examples[node.name] = [_dim_hint(d) for d in val.shape]
            elif node.op == "call_function":
                self.env[node.name] = self.call(node)
            elif node.op == "output":
                outputs = self.outputs(node.args[0])
        structure = _structure(program.call_spec.out_spec, iter(range(len(outputs))))
        ranges = self.ranges()
        metadata = {"source": "torch", "framework_version": torch.__version__, "exported": self.root,
                    "example_shapes": examples}
        if ranges:
            metadata["dim_ranges"] = ranges
        out = Graph(inputs, outputs, self.nodes, self.constants, self.layers, structure, metadata)
        out.validate("from_torch")
        return out

    def name_dims(self, graph: Any) -> None:
        """"batch" and "steps" for the first recurrent op's axes (a cell's: batch only); other dynamic dims
        by input and axis."""
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            dims = []
            if node.target is torch.ops.lstm_engine.recurrent.default and self.rank(node.args[0]) == 3:
                x, batch_first = self.dims(node.args[0]), node.args[7]
                dims = [(x[0], "batch"), (x[1], "steps")] if batch_first else [(x[1], "batch"), (x[0], "steps")]
            elif _key(node.target) in _CELLS and self.rank(node.args[0]) == 2:
                dims = [(self.dims(node.args[0])[0], "batch")]
            for sym, name in dims:
                if not isinstance(sym, int) and getattr(sym, "is_Symbol", False):
                    self.dim_names.setdefault(sym, name)
            if dims:
                break
        for node in graph.nodes:
            if node.op == "placeholder" and isinstance(node.meta.get("val"), torch.Tensor):
                for axis, d in enumerate(self.dims(node)):
                    if not isinstance(d, int) and d not in self.dim_names:
                        self.dim_names[d] = f"{node.name}_dim{axis}"

    def dim_name(self, d: Any) -> Any:
        if isinstance(d, int):
            return d
        if d not in self.dim_names:  # an input axis torch tied to an expression of others
            raise LoadError(f"from_torch: an input axis has the size {d} (a function of other axes); "
                            "lstm_engine takes independent input sizes")
        return self.dim_names[d]

    def ranges(self) -> dict:
        """{dim name: [min, max or None]} where the forward restricts a size beyond "any size ≥ 1"."""
        out = {}
        for sym, bounds in self.program.range_constraints.items():
            if sym not in self.dim_names:
                continue
            lo, hi = int(bounds.lower), (None if bounds.upper in (int_oo, sympy.oo) else int(bounds.upper))
            # export assumes sizes ≥ 2 and treats 1 like them; only a forward that squeezes the axis differs.
            if lo <= 2 and sym not in self.min_two:
                lo = 1
            if lo > 1 or hi is not None:
                out[self.dim_names[sym]] = [lo, hi]
        return out

    def outputs(self, flat: Any) -> list[str]:
        names = []
        for item in flat:
            v = self.env.get(item.name) if isinstance(item, torch.fx.Node) else item
            if isinstance(v, (list, tuple)) or (v is not None and not isinstance(v, (str, torch.Tensor))):
                raise LoadError(f"from_torch: {self.root}.forward returns a {type(v).__name__}; lstm_engine "
                                "returns tensors (in tuples and lists)")
            if v is None:
                raise LoadError(f"from_torch: {self.root}.forward returns None among its outputs")
            names.append(self.value(v))
        return names

    def call(self, node: Any) -> Any:
        target = node.target
        if target is operator.getitem:
            seq = self.env[node.args[0].name]
            return seq[node.args[1]]
        args = [self.arg(a) for a in node.args]
        kwargs = {k: self.arg(v) for k, v in node.kwargs.items()}
        if target is torch.ops.lstm_engine.recurrent.default:
            return self.recurrent(node, *args)
        key = _key(target)
        if key in _IDENTITY:
            return args[0]
        if key in _SHAPE_ARITH:
            return None  # a size computed from shapes: read through the sym value where it is used
        if _foldable(target, args, kwargs):
            with torch.no_grad():
                return target(*args, **kwargs)
        if key in _ZEROS or (key == "aten.full.default" and args[1] == 0):
            return _Zeros(node)
        handler = _HANDLERS.get(key)
        if handler is None:
            raise self.refuse(key.rsplit(".", 1)[0] if key.startswith("aten.") else key)
        return handler(self, node, *_bind(target, args, kwargs))

    def arg(self, a: Any) -> Any:
        if isinstance(a, torch.fx.Node):
            v = self.env[a.name]
            if v is None:  # a size: its symbolic value
                return a.meta["val"]
            return v
        if isinstance(a, (list, tuple)):
            return type(a)(self.arg(x) for x in a)
        return a

    # -- recurrent layers ----------------------------------------------------------------------
    def recurrent(self, node: Any, x, h0, c0, weights, mode, num_layers, bidirectional, batch_first,
                  has_biases) -> tuple:
        D = 2 if bidirectional else 1
        per = len(weights) // (num_layers * D)
        state: dict[str, np.ndarray] = {}
        for k in range(num_layers):
            for d in range(D):
                group = weights[(k * D + d) * per:(k * D + d + 1) * per]
                names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if has_biases else [])
                names += ["weight_hr"] if len(group) > len(names) else []
                for name, w in zip(names, group):
                    if not isinstance(w, torch.Tensor):
                        raise self.refuse(str(node.target), "has weights computed from the input")
                    state[f"{name}_l{k}{'_reverse' if d else ''}"] = _array(w)
        try:
            layers = recurrent_layers_from_state_dict(
                state, nonlinearity="relu" if mode == "RNN_RELU" else "tanh", dtype=self.dtype,
                source=self.source(node))
        except (TypeError, ValueError) as exc:
            raise LoadError(str(exc)) from exc
        h0 = "" if isinstance(h0, _Zeros) or h0 is None else h0
        c0 = "" if isinstance(c0, _Zeros) or c0 is None else c0
        y = x if batch_first else self.emit("Transpose", [x], {"perm": [1, 0, 2]})
        hs, cs = [], []
        for k, layer in enumerate(layers):
            def part(s):
                if isinstance(s, str) and not s:
                    return ""
                return self.emit("Slice", [s], {"starts": [k * D], "ends": [(k + 1) * D], "axes": [0]}) \
                    if num_layers > 1 else s
            index = len(self.layers)
            self.layers.append(layer)
            lstm = mode == "LSTM"
            ins = [y, "", part(h0)] + ([part(c0)] if lstm else [])
            path = self.module_path(node) or "rnn"
            outs = self.emit("Recurrent", ins, {"layer": index}, ["y", "h_n", "c_n"][:3 if lstm else 2],
                             name=f"{path}.l{k}" if num_layers > 1 else path)
            y, hs = outs[0], hs + [outs[1]]
            cs += [outs[2]] if lstm else []
        if not batch_first:
            y = self.emit("Transpose", [y], {"perm": [1, 0, 2]})
        path = self.module_path(node) or "rnn"
        h = hs[0] if len(hs) == 1 else self.emit("Concat", hs, {"axis": 0}, name=f"{path}.h_n")
        c = (cs[0] if len(cs) == 1 else self.emit("Concat", cs, {"axis": 0}, name=f"{path}.c_n")) if cs else None
        return (y, h, c)


    def cell_layer(self, node: Any, weights: list, nonlinearity: str) -> int:
        """The index in graph.layers of the one-layer LSTM/GRU/RNN an nn.*Cell's weights make (one per cell,
        however many steps call it)."""
        key = tuple(id(w) for w in weights)
        if key not in self.cells:
            names = ["weight_ih", "weight_hh", "bias_ih", "bias_hh"]
            state = {n: _array(w) for n, w in zip(names, weights) if w is not None}
            try:
                layer, = recurrent_layers_from_state_dict(state, nonlinearity=nonlinearity, dtype=self.dtype,
                                                          source=self.source(node))
            except (TypeError, ValueError) as exc:
                raise LoadError(str(exc)) from exc
            self.cells[key] = len(self.layers)
            self.layers.append(layer)
        return self.cells[key]


# -- small helpers -----------------------------------------------------------------------------------

def _key(target: Any) -> str:
    """'aten.linear.default' for an OpOverload; the function's name otherwise."""
    return str(target) if isinstance(target, torch._ops.OpOverload) else getattr(target, "__name__", str(target))


def _dim(d: Any) -> Any:
    if isinstance(d, int):
        return d
    expr = d.node.expr
    return int(expr) if expr.is_number else expr


def _array(t: torch.Tensor) -> np.ndarray:
    """A tensor's values; float16/bfloat16 widened to float32, float64 kept."""
    t = t.detach().cpu()
    if t.is_floating_point() and t.dtype != torch.float64:
        t = t.float()
    return t.numpy()


def _dim_hint(d: Any) -> int:
    """A size as the example input had it."""
    return d if isinstance(d, int) else int(d.node.hint)


def _value_dtype(dt: torch.dtype) -> str:
    if dt.is_floating_point:
        return "float"
    return {torch.int64: "int64", torch.int32: "int32", torch.bool: "bool"}.get(dt, "int64")


def _flat(items: Any):
    for a in items:
        if isinstance(a, (list, tuple)):
            yield from _flat(a)
        else:
            yield a


def _foldable(target: Any, args: list, kwargs: dict) -> bool:
    """Every input known now (constants, literals), so torch computes it once at load."""
    values = list(_flat(args)) + list(_flat(kwargs.values()))
    if any(isinstance(v, (_Value, _Zeros, torch.SymInt, torch.SymFloat)) for v in values):
        return False
    return _key(target) not in _NEVER_FOLD


_NEVER_FOLD = {"aten.dropout.default", "aten.rand.default", "aten.randn.default", "aten.bernoulli.default",
               "aten.rand_like.default", "aten.randn_like.default", "aten.randint.default"}


def _bind(target: Any, args: list, kwargs: dict) -> list:
    """The op's arguments in schema order, defaults filled in."""
    out = []
    for i, a in enumerate(target._schema.arguments):
        if i < len(args):
            out.append(args[i])
        elif a.name in kwargs:
            out.append(kwargs[a.name])
        elif a.has_default_value():
            out.append(a.default_value)
        else:
            out.append(None)
    return out


def _structure(spec: Any, counter: Any) -> Any:
    """The output nesting of a pytree spec over output indices."""
    if spec.is_leaf():
        return next(counter)
    kind = spec.type
    children = [_structure(c, counter) for c in spec.children()]
    if kind is list:
        return children
    if kind is tuple or (isinstance(kind, type) and issubclass(kind, tuple)):
        return tuple(children)
    raise LoadError(f"from_torch: forward returns a {getattr(kind, '__name__', kind)}; lstm_engine returns "
                    "tensors, tuples and lists of them")


def supported_ops() -> list[str]:
    """The torch ops from_torch maps (ATen names), plus nn.LSTM/GRU/RNN."""
    names = {k.rsplit(".", 1)[0] for k in list(_HANDLERS) + list(_IDENTITY) if k.startswith("aten.")}
    return ["nn.LSTM", "nn.GRU", "nn.RNN"] + sorted(names)

# -- ATen op handlers: handler(converter, fx node, *arguments in schema order) -> value(s) --------------

_HANDLERS: dict[str, Callable] = {}
# Ops that only change a tensor's memory or autograd status: the value passes through.
_IDENTITY = {f"aten.{n}.default" for n in ("contiguous", "clone", "alias", "detach", "lift_fresh_copy")}
# Python arithmetic on sizes and ATen's size queries: read where used, through the symbolic value.
_SHAPE_ARITH = {"aten.sym_size.int", "aten.sym_numel.default", "add", "sub", "mul", "floordiv", "truediv",
                "sym_max", "sym_min", "aten._assert_scalar.default", "aten.sym_constrain_range_for_size.default",
                "_assert_scalar", "ge", "le", "gt", "lt", "eq", "ne", "sym_not"}
# Zeros whose shape depends on the input (constant ones are folded): an RNN's initial state, or refused.
_ZEROS = {"aten.zeros.default", "aten.new_zeros.default", "aten.zeros_like.default"}


def handles(*keys: str) -> Callable:
    def register(fn: Callable) -> Callable:
        for key in keys:
            _HANDLERS[key] = fn
        return fn
    return register


def _fx(node: Any, i: int) -> Any:
    """The fx argument at position i (for its recorded dtype and shape)."""
    return node.args[i] if i < len(node.args) else None


def _typed(cv: _Converter, v: Any, fx_arg: Any, kind: str) -> str:
    """v as a graph value of kind ("float", "int64", "bool"), cast or made a constant as needed."""
    if isinstance(v, _Value):
        return v if cv.kind(fx_arg) == kind else cv.emit("Cast", [v], {"to": kind})
    # Float constants are kept in float64: the plan casts them to the dtype the model runs in.
    dt = {"float": np.float64, "int64": np.int64, "int32": np.int32, "bool": np.bool_}[kind]
    if isinstance(v, torch.Tensor):
        v = _array(v)
    return cv.value(np.asarray(v, dtype=dt))


def _binary(op: str) -> Callable:
    def handle(cv: _Converter, node: Any, a: Any, b: Any, alpha: Any = 1, *_: Any) -> str:
        kind = cv.kind(node)
        if node.target in _COMPARISONS:
            kind = "float" if "float" in (cv.kind(_fx(node, 0)), cv.kind(_fx(node, 1))) else "int64"
        a, b = _typed(cv, a, _fx(node, 0), kind), _typed(cv, b, _fx(node, 1), kind)
        if node.target in _REVERSED:  # rsub: other - alpha * self
            a, b = b, cv.emit("Mul", [a, _typed(cv, alpha, None, kind)]) if alpha != 1 else a
        elif alpha != 1:
            b = cv.emit("Mul", [b, _typed(cv, alpha, None, kind)])
        return cv.emit(op, [a, b])
    return handle


_REVERSED = {torch.ops.aten.rsub.Scalar, torch.ops.aten.rsub.Tensor}
_COMPARISONS = {getattr(getattr(torch.ops.aten, n), o) for n in ("eq", "lt", "gt", "le", "ge", "ne")
                for o in ("Tensor", "Scalar")}
for _name, _op in (("add", "Add"), ("sub", "Sub"), ("mul", "Mul"), ("div", "Div"), ("maximum", "Max"),
                   ("minimum", "Min"), ("eq", "Equal"), ("lt", "Less"), ("gt", "Greater"), ("rsub", "Sub"),
                   ("pow", "Pow")):
    handles(f"aten.{_name}.Tensor", f"aten.{_name}.Scalar", f"aten.{_name}.default",
            f"aten.{_name}.Tensor_Scalar", f"aten.{_name}.Tensor_Tensor")(_binary(_op))


@handles("aten.div.Tensor_mode")
def _div_mode(cv, node, a, b, rounding_mode):
    if rounding_mode is not None:
        raise cv.refuse("aten.div", f"with rounding_mode={rounding_mode!r} is not supported")
    return _binary("Div")(cv, node, a, b)


@handles("aten.le.Tensor", "aten.le.Scalar", "aten.ge.Tensor", "aten.ge.Scalar", "aten.ne.Tensor",
         "aten.ne.Scalar")
def _negated_comparison(cv, node, a, b):
    op = {"le": "Greater", "ge": "Less", "ne": "Equal"}[str(node.target).split(".")[1]]
    return cv.emit("Not", [_binary(op)(cv, node, a, b)])


def _unary(op: str, **attrs: Any) -> Callable:
    def handle(cv: _Converter, node: Any, x: Any, *_: Any) -> str:
        return cv.emit(op, [x], attrs)
    return handle


for _name, _op in (("relu", "Relu"), ("tanh", "Tanh"), ("sigmoid", "Sigmoid"), ("neg", "Neg"), ("abs", "Abs"),
                   ("exp", "Exp"), ("log", "Log"), ("sqrt", "Sqrt"), ("reciprocal", "Reciprocal"), ("erf", "Erf"),
                   ("logical_not", "Not")):
    handles(f"aten.{_name}.default")(_unary(_op))
handles("aten.hardsigmoid.default")(_unary("HardSigmoid", alpha=1 / 6, beta=0.5))


@handles("aten.dropout.default")
def _dropout(cv, node, x, p, train):
    # Dropout with training=True is decomposed into aten.native_dropout, which is refused.
    return x


@handles("aten.rsqrt.default")
def _rsqrt(cv, node, x):
    return cv.emit("Reciprocal", [cv.emit("Sqrt", [x])])


@handles("aten.silu.default")
def _silu(cv, node, x):
    return cv.emit("Mul", [x, cv.emit("Sigmoid", [x])])


@handles("aten.gelu.default")
def _gelu(cv, node, x, approximate):
    return cv.emit("Gelu", [x], {"approximate": approximate})


@handles("aten.elu.default")
def _elu(cv, node, x, alpha, scale, input_scale):
    if scale != 1 or input_scale != 1:
        raise cv.refuse("aten.elu", f"with scale={scale}, input_scale={input_scale} (SELU/CELU) is not supported")
    return cv.emit("Elu", [x], {"alpha": float(alpha)})


@handles("aten.leaky_relu.default")
def _leaky_relu(cv, node, x, negative_slope):
    return cv.emit("LeakyRelu", [x], {"alpha": float(negative_slope)})


@handles("aten.hardtanh.default")
def _hardtanh(cv, node, x, min_val, max_val):
    return cv.emit("Clip", [x], {"min": float(min_val), "max": float(max_val)})


@handles("aten.relu6.default")
def _relu6(cv, node, x):
    return cv.emit("Clip", [x], {"min": 0.0, "max": 6.0})


@handles("aten.softplus.default")
def _softplus(cv, node, x, beta, threshold):
    if beta != 1:
        raise cv.refuse("aten.softplus", f"with beta={beta} is not supported (beta=1 is)")
    # torch returns x itself above the threshold, where log1p(exp(x)) differs from x by < exp(-threshold).
    return cv.emit("Softplus", [x])


@handles("aten.clamp.default", "aten.clamp_min.default", "aten.clamp_max.default")
def _clamp(cv, node, x, *bounds):
    name = str(node.target).split(".")[1]
    lo, hi = (bounds + (None,))[:2] if name == "clamp" else ((bounds[0], None) if name == "clamp_min" else
                                                            (None, bounds[0]))
    if any(isinstance(b, (str, torch.Tensor)) for b in (lo, hi)):
        raise cv.refuse(f"aten.{name}", "with tensor bounds is not supported (numbers are)")
    return cv.emit("Clip", [x], {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)})


@handles("aten.where.self")
def _where(cv, node, cond, a, b):
    kind = cv.kind(node)
    return cv.emit("Where", [_typed(cv, cond, _fx(node, 0), "bool"), _typed(cv, a, _fx(node, 1), kind),
                             _typed(cv, b, _fx(node, 2), kind)])


@handles("aten.masked_fill.Scalar", "aten.masked_fill.Tensor")
def _masked_fill(cv, node, x, mask, value):
    kind = cv.kind(node)
    return cv.emit("Where", [_typed(cv, mask, _fx(node, 1), "bool"), _typed(cv, value, _fx(node, 2), kind), x])


@handles("aten.softmax.int", "aten._softmax.default", "aten.log_softmax.int", "aten._log_softmax.default")
def _softmax(cv, node, x, dim, *_):
    op = "LogSoftmax" if "log" in str(node.target) else "Softmax"
    return cv.emit(op, [x], {"axis": int(dim)})


# -- linear algebra and normalisation -----------------------------------------------------------------

@handles("aten.linear.default")
def _linear(cv, node, x, weight, bias):
    if isinstance(weight, torch.Tensor):
        w_t = cv.value(weight.detach().t().contiguous(), cv.param_names.get(id(weight), "const_" + node.name) + ".T")
    else:
        w_t = cv.emit("Transpose", [weight], {"perm": [1, 0]})
    y = cv.emit("MatMul", [x, w_t])
    return y if bias is None else cv.emit("Add", [y, bias])


_CELLS = ("aten.lstm_cell.default", "aten.gru_cell.default", "aten.rnn_tanh_cell.default",
          "aten.rnn_relu_cell.default")


@handles(*_CELLS)
def _cell(cv, node, x, hx, w_ih, w_hh, b_ih, b_hh):
    """One step of an nn.LSTMCell/GRUCell/RNNCell: a Recurrent node over one timestep. A Python loop over
    the steps is unrolled by the export, which fixes the number of steps."""
    name = str(node.target).split(".")[1]
    weights = [w_ih, w_hh, b_ih, b_hh]
    if any(w is not None and not isinstance(w, torch.Tensor) for w in weights):
        raise cv.refuse(f"aten.{name}", "with weights computed from the input is not supported")
    if cv.rank(_fx(node, 0)) != 2:
        raise cv.refuse(f"aten.{name}", "on an unbatched (1-D) input is not supported")
    lstm = name == "lstm_cell"
    index = cv.cell_layer(node, weights, "relu" if name == "rnn_relu_cell" else "tanh")
    states = list(hx) if lstm else [hx]

    def initial(s):
        return "" if s is None or isinstance(s, _Zeros) else cv.emit("Unsqueeze", [s], {"axes": [0]})

    x3 = cv.emit("Unsqueeze", [x], {"axes": [1]})
    outs = cv.emit("Recurrent", [x3, ""] + [initial(s) for s in states], {"layer": index},
                   outputs=3 if lstm else 2)
    finals = [cv.emit("Squeeze", [s], {"axes": [0]}) for s in outs[1:]]
    return tuple(finals) if lstm else finals[0]


@handles("aten.matmul.default", "aten.mm.default", "aten.bmm.default")
def _matmul(cv, node, a, b):
    return cv.emit("MatMul", [a, b])


@handles("aten.addmm.default")
def _addmm(cv, node, c, a, b, beta, alpha):
    return cv.emit("Gemm", [a, b, c], {"alpha": float(alpha), "beta": float(beta)})


@handles("aten.t.default")
def _t(cv, node, x):
    return x if cv.rank(_fx(node, 0)) < 2 else cv.emit("Transpose", [x], {"perm": [1, 0]})


@handles("aten.einsum.default")
def _einsum(cv, node, equation, tensors, *_):
    return cv.emit("Einsum", list(tensors), {"equation": equation.replace(" ", "")})


@handles("aten.embedding.default")
def _embedding(cv, node, weight, ids, padding_idx, scale_grad_by_freq, sparse):
    return cv.emit("Gather", [weight, ids], {"axis": 0})


@handles("aten.layer_norm.default")
def _layer_norm(cv, node, x, normalized_shape, weight, bias, eps, *_):
    n = len(normalized_shape)
    if weight is None:
        weight = np.ones(normalized_shape, np.float32)
    return cv.emit("LayerNormalization", [x, weight, bias], {"axis": -n, "epsilon": float(eps)})


@handles("aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default")
def _batch_norm(cv, node, x, weight, bias, mean, var, *rest):
    legit = "legit" in str(node.target)
    training, eps = (False, rest[1]) if legit else (rest[0], rest[2])
    if training or mean is None or var is None:
        raise cv.refuse(str(node.target).rsplit(".", 1)[0], "in training mode or without running statistics "
                        "(track_running_stats=False) is not supported")
    channels = mean.shape[0]
    weight = np.ones(channels, np.float32) if weight is None else weight
    bias = np.zeros(channels, np.float32) if bias is None else bias
    y = cv.emit("BatchNormalization", [x, weight, bias, mean, var], {"epsilon": float(eps)})
    return (y, None, None) if legit else y


@handles("aten.conv1d.default", "aten.conv1d.padding", "aten.convolution.default")
def _conv(cv, node, x, weight, bias, stride, padding, dilation, *rest):
    if "convolution" in str(node.target):
        transposed, _, groups = rest
        if transposed:
            raise cv.refuse("aten.convolution", "(a transposed convolution) is not supported")
    else:
        groups = rest[0]
    if cv.rank(_fx(node, 0)) != 3 or (isinstance(weight, torch.Tensor) and weight.dim() != 3):
        raise cv.refuse(str(node.target).rsplit(".", 1)[0], "is supported for 1-D (N, C, L) inputs only")
    stride, dilation = [int(v) for v in _list(stride)], [int(v) for v in _list(dilation)]
    k = weight.shape[-1]
    if isinstance(padding, str):
        total = dilation[0] * (k - 1) if padding == "same" else 0
        pads = [total // 2, total - total // 2]
    else:
        pads = [int(_list(padding)[0])] * 2
    return cv.emit("Conv", [x, weight, bias], {"kernel_shape": [int(k)], "strides": stride, "pads": pads,
                                                "dilations": dilation, "group": int(groups)})


def _list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@handles("aten.constant_pad_nd.default", "aten.pad.default", "aten.reflection_pad1d.default",
         "aten.replication_pad1d.default")
def _pad(cv, node, x, pad, *rest):
    name = str(node.target).split(".")[1]
    mode = {"reflection_pad1d": "reflect", "replication_pad1d": "edge"}.get(name, "constant")
    value = rest[0] if name == "constant_pad_nd" else 0.0
    if name == "pad":
        mode = {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.get(rest[0])
        if mode is None:
            raise cv.refuse("aten.pad", f"with mode={rest[0]!r} is not supported")
        value = rest[1] or 0.0
    rank = cv.rank(_fx(node, 0))
    pad = [int(p) for p in pad]
    if any(p < 0 for p in pad):
        raise cv.refuse(f"aten.{name}", "with negative padding (cropping) is not supported")
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):  # torch pads the last axis first
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    return cv.emit("Pad", [x], {"pads": begins + ends, "mode": mode, "value": float(value)})


# -- shapes ---------------------------------------------------------------------------------------------

@handles("aten.transpose.int")
def _transpose(cv, node, x, d0, d1):
    perm = list(range(cv.rank(_fx(node, 0))))
    perm[d0], perm[d1] = perm[d1], perm[d0]
    return cv.emit("Transpose", [x], {"perm": perm})


@handles("aten.permute.default")
def _permute(cv, node, x, dims):
    rank = cv.rank(_fx(node, 0))
    return cv.emit("Transpose", [x], {"perm": [int(d) % rank for d in dims]})


def _reshape_to(cv: _Converter, node: Any, x: Any, target: list) -> str:
    """Reshape x to the sizes torch computed: fixed ints, 0 to keep an input size, -1 for the one left."""
    source = cv.dims(_fx(node, 0))
    shape = []
    for i, entry in enumerate(target):
        d = _dim(entry)
        if isinstance(d, int):
            if d == 0:
                raise cv.refuse(str(node.target).rsplit(".", 1)[0], "to a shape with a 0 size is not supported")
            shape.append(d)
        elif i < len(source) and source[i] == d:
            shape.append(0)
        else:
            shape.append(-1)
    if shape.count(-1) > 1:
        raise cv.refuse(str(node.target).rsplit(".", 1)[0], f"to {list(target)}: more than one size depends on "
                        "the input in a way lstm_engine cannot follow")
    return cv.emit("Reshape", [x], {"shape": shape})


@handles("aten.reshape.default", "aten.view.default", "aten._unsafe_view.default")
def _reshape(cv, node, x, shape):
    return _reshape_to(cv, node, x, list(shape))


@handles("aten.flatten.using_ints")
def _flatten(cv, node, x, start, end):
    dims = cv.dims(_fx(node, 0))
    rank = max(len(dims), 1)
    start, end = start % rank, end % rank
    if start == end:
        return x
    return _reshape_to(cv, node, x, list(cv.meta(node).shape))


@handles("aten.squeeze.dim", "aten.squeeze.dims", "aten.squeeze.default")
def _squeeze(cv, node, x, dims=None):
    shape = cv.dims(_fx(node, 0))
    rank = len(shape)
    axes = range(rank) if dims is None else [d % max(rank, 1) for d in _list(dims)]
    # torch drops an axis only where its size is 1; an axis of a size that varies is kept, which is
    # torch's result for every size but 1: that size is refused at run time (dim_ranges).
    for a in axes:
        if not isinstance(shape[a], int):
            cv.min_two.update(shape[a].free_symbols)
    keep = [a for a in axes if shape[a] == 1]
    return cv.emit("Squeeze", [x], {"axes": keep}) if keep else x


@handles("aten.unsqueeze.default")
def _unsqueeze(cv, node, x, dim):
    return cv.emit("Unsqueeze", [x], {"axes": [int(dim)]})


@handles("aten.cat.default")
def _cat(cv, node, tensors, dim):
    kind = cv.kind(node)
    items = [_typed(cv, t, f, kind) for t, f in zip(tensors, _fx(node, 0))]
    return cv.emit("Concat", items, {"axis": int(dim)})


@handles("aten.stack.default")
def _stack(cv, node, tensors, dim):
    rank = cv.rank(node)
    axis = int(dim) % rank
    kind = cv.kind(node)
    items = [cv.emit("Unsqueeze", [_typed(cv, t, f, kind)], {"axes": [axis]}) for t, f in zip(tensors, _fx(node, 0))]
    return cv.emit("Concat", items, {"axis": axis})


def _static(cv: _Converter, node: Any, *values: Any) -> None:
    if any(not isinstance(v, int) and v is not None for v in values):
        raise cv.refuse(str(node.target).rsplit(".", 1)[0], "with a bound computed from the input's size "
                        "is not supported (fixed numbers are)")


@handles("aten.slice.Tensor")
def _slice(cv, node, x, dim, start, end, step):
    _static(cv, node, start, end, step)
    start = 0 if start is None else start
    end = INT64_MAX if end is None else end
    if start == 0 and end >= INT64_MAX and step == 1:
        return x
    return cv.emit("Slice", [x], {"starts": [start], "ends": [end], "axes": [int(dim)], "steps": [int(step)]})


@handles("aten.narrow.default")
def _narrow(cv, node, x, dim, start, length):
    _static(cv, node, start, length)
    end = start + length if start >= 0 or start + length < 0 else INT64_MAX
    return cv.emit("Slice", [x], {"starts": [start], "ends": [end], "axes": [int(dim)]})


@handles("aten.select.int")
def _select(cv, node, x, dim, index):
    _static(cv, node, index)
    return cv.emit("Gather", [x, np.array(index, np.int64)], {"axis": int(dim)})


@handles("aten.index.Tensor")
def _index(cv, node, x, indices):
    given = [i for i, t in enumerate(indices) if t is not None]
    if len(given) != 1:
        raise cv.refuse("aten.index", "with more than one index tensor is not supported")
    axis = given[0]
    idx = indices[axis]
    fx_idx = _fx(node, 1)[axis]
    if (isinstance(idx, torch.Tensor) and idx.dtype == torch.bool) or (
            isinstance(idx, str) and cv.kind(fx_idx) == "bool"):
        raise cv.refuse("aten.index", "with a boolean mask (a size that depends on the data) is not supported")
    return cv.emit("Gather", [x, idx], {"axis": axis})


@handles("aten.flip.default")
def _flip(cv, node, x, dims):
    dims = [int(d) for d in dims]
    return cv.emit("Slice", [x], {"starts": [-1] * len(dims), "ends": [-INT64_MAX] * len(dims), "axes": dims,
                                  "steps": [-1] * len(dims)})


@handles("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int")
def _split(cv, node, x, size, dim=0):
    name = str(node.target).split(".")[1]
    if name == "unbind":
        size, dim = 1, size
    length = cv.dims(_fx(node, 0))[dim]
    if not isinstance(length, int):
        raise cv.refuse(f"aten.{name}", "along an axis whose size varies is not supported")
    if name == "split_with_sizes":
        sizes = [int(s) for s in size]
    elif name == "chunk":
        step = -(-length // size)
        sizes = [min(step, length - i) for i in range(0, length, step)]
    else:
        sizes = [min(size, length - i) for i in range(0, length, size)]
    parts = cv.emit("Split", [x], {"axis": int(dim), "split": sizes}, outputs=len(sizes))
    parts = [parts] if isinstance(parts, str) else parts
    if name == "unbind":
        parts = [cv.emit("Squeeze", [p], {"axes": [int(dim)]}) for p in parts]
    return tuple(parts)


def _expand_to(cv: _Converter, node: Any, x: Any, target: list) -> str:
    source = cv.dims(_fx(node, 0))
    lead = len(target) - len(source)
    shape = []
    for i, entry in enumerate(target):
        d = _dim(entry)
        have = source[i - lead] if i >= lead else 1
        if d == -1 or (not isinstance(d, int) and d == have):
            shape.append(1)  # ONNX's Expand keeps the input's size where the shape says 1
        elif isinstance(d, int):
            shape.append(d)
        else:
            raise cv.refuse(str(node.target).rsplit(".", 1)[0], "to a size that varies is not supported")
    return cv.emit("Expand", [x], {"shape": shape})


@handles("aten.expand.default")
def _expand(cv, node, x, size, *_):
    return _expand_to(cv, node, x, list(size))


@handles("aten.expand_as.default")
def _expand_as(cv, node, x, other):
    return _expand_to(cv, node, x, list(cv.meta(_fx(node, 1)).shape))


@handles("aten.repeat.default")
def _repeat(cv, node, x, repeats):
    _static(cv, node, *repeats)
    rank = cv.rank(_fx(node, 0))
    if len(repeats) > rank:
        x = cv.emit("Unsqueeze", [x], {"axes": list(range(len(repeats) - rank))})
    return cv.emit("Tile", [x], {"repeats": [int(r) for r in repeats]})


@handles("aten._to_copy.default", "aten.to.dtype", "aten.to.dtype_layout", "aten.to.device",
         "aten.type_as.default")
def _to(cv, node, x, *_):
    src, dst = cv.kind(_fx(node, 0)), cv.kind(node)
    return x if src == dst else cv.emit("Cast", [x], {"to": dst})


# -- reductions -----------------------------------------------------------------------------------------

def _axes(dims: Any) -> list | None:
    if dims is None:
        return None
    dims = [int(d) for d in _list(dims)]
    return dims or None


@handles("aten.mean.dim", "aten.mean.default", "aten.sum.dim_IntList", "aten.sum.default", "aten.amax.default",
         "aten.amin.default")
def _reduce(cv, node, x, dims=None, keepdim=False, *_):
    name = str(node.target).split(".")[1]
    op = {"mean": "ReduceMean", "sum": "ReduceSum", "amax": "ReduceMax", "amin": "ReduceMin"}[name]
    if str(node.target).endswith(".default") and name in ("mean", "sum"):
        dims, keepdim = None, False
    if name == "sum" and cv.kind(_fx(node, 0)) == "bool":
        x = cv.emit("Cast", [x], {"to": "int64"})
    return cv.emit(op, [x], {"axes": _axes(dims), "keepdims": int(bool(keepdim))})


@handles("aten.max.dim", "aten.min.dim")
def _max_dim(cv, node, x, dim, keepdim):
    is_max = ".max." in str(node.target)
    values = cv.emit("ReduceMax" if is_max else "ReduceMin", [x], {"axes": [int(dim)], "keepdims": int(keepdim)})
    wanted = any(u.target is operator.getitem and u.args[1] == 1 for u in node.users)
    if not wanted:
        return (values, None)
    if not is_max:
        raise cv.refuse("aten.min.dim", "with its indices used is not supported (torch.max's are)")
    return (values, cv.emit("ArgMax", [x], {"axis": int(dim), "keepdims": int(keepdim)}))


@handles("aten.max.default", "aten.min.default")
def _max_all(cv, node, x):
    op = "ReduceMax" if ".max." in str(node.target) else "ReduceMin"
    return cv.emit(op, [x], {"axes": None, "keepdims": 0})


@handles("aten.argmax.default")
def _argmax(cv, node, x, dim, keepdim):
    if dim is None:
        x, dim = cv.emit("Reshape", [x], {"shape": [-1]}), 0
    return cv.emit("ArgMax", [x], {"axis": int(dim), "keepdims": int(keepdim)})


@handles("aten.linalg_vector_norm.default", "aten.linalg_norm.default", "aten.norm.ScalarOpt_dim",
         "aten.norm.Scalar")
def _norm(cv, node, x, ord=2, dim=None, keepdim=False, *_):
    name = str(node.target).split(".")[1]
    if name == "linalg_norm" and ord is None:
        ord = 2  # the vector 2-norm (the Frobenius norm over two axes)
    ord = 2 if ord is None else ord
    attrs = {"axes": _axes(dim), "keepdims": int(bool(keepdim))}
    if ord == 2:
        return cv.emit("ReduceL2", [x], attrs)
    if ord == 1:
        return cv.emit("ReduceSum", [cv.emit("Abs", [x])], attrs)
    if ord == float("inf"):
        return cv.emit("ReduceMax", [cv.emit("Abs", [x])], attrs)
    raise cv.refuse(f"aten.{name}", f"with ord={ord} is not supported (1, 2 and inf are)")
