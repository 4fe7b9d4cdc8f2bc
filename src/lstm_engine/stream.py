"""Streaming a model's plan chunk by chunk: which graphs can, and the runner Session and the pool share.

A graph streams when every op is causal per step: output step t depends on input steps up to t
only, through the recurrent states the session carries. ``time_axes`` proves it op by op from the
time axis of each value (the graph inputs' dim named "steps"), and otherwise raises ValueError naming
the node: pooling, indexing or normalising over time, convolutions along time, bidirectional or
backwards layers, and ops that mix a final state with per-step values.

``Streamer`` is a model's plan bound to the buffers of one session (or pool): the same ``Plan.run``
as ``model.forward``, with the states, output buffers and Keras-mask bookkeeping in its ``Call``.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from . import ops as _ops
from .graph import Graph, Node, id_range
from .plan import Call

FINAL = "final"  # a value that depends on the whole prefix read so far but has no time axis (h_n)

# Chunks longer than this many elements of the widest buffer run in slices, so that one huge feed()
# does not keep gigabytes of scratch alive for the session's lifetime.
MAX_CHUNK_ELEMENTS = 1 << 22

_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Abs", "Exp", "Log", "Reciprocal", "Erf",
                "Max", "Min", "Where", "Equal", "Less", "Greater", "Not", "And", "Clip", "Relu", "Tanh",
                "Sigmoid", "Gelu", "Elu", "LeakyRelu", "HardSigmoid", "Softplus", "Softsign", "Identity", "Cast"}


def check_floats(arr: np.ndarray, where: str) -> None:
    """A state array must hold floats; it is copied into the session's own dtype."""
    if arr.dtype.kind != "f":
        raise TypeError(f"{where}: expected floats, got dtype {arr.dtype}")


def check_streamable(model: Any, what: str = "model.session()") -> None:
    """Raise ValueError naming the node that keeps the model from streaming step by step."""
    time_axes(model, what)


class _NotCausal(Exception):
    pass


def time_axes(model: Any, what: str = "model.session()") -> dict[str, Any]:
    """Per value name: its time axis (int), None (no time dependence) or FINAL; ValueError if it cannot stream.

    A graph input's time axis is the dim it names "steps". Where one input names none (an ONNX file's own
    dim names), each of its axes of open size is tried: the one axis with which the graph proves causal up
    to its recurrent layers (they step along axis 1 of their input) is its time axis.
    """
    graph = model.graph
    fed = [info for info in graph.inputs if not info.optional]
    unnamed = [info for info in fed if info.time_axis is None]
    if len(unnamed) == 1 and any(n.op == "Recurrent" for n in graph.nodes):
        info = unnamed[0]
        found, errors = [], []
        for axis, dim in enumerate(info.shape):
            if isinstance(dim, int):
                continue
            try:
                found.append(_time_axes(model, what, {info.name: axis}))
            except ValueError as exc:
                errors.append(str(exc))
        if len(found) == 1:
            return found[0]
        # None proved causal: say why with the axis that reached furthest (past the recurrent layers' input).
        reasons = [e for e in errors if "time axis is not axis 1" not in e and "no axis named" not in e]
        if not found and reasons:
            raise ValueError(reasons[0])
    return _time_axes(model, what, {})


def _time_axes(model: Any, what: str, chosen: dict[str, int]) -> dict[str, Any]:
    graph = model.graph
    axes: dict[str, Any] = {}
    ranks: dict[str, int | None] = {}
    for info in graph.inputs:
        if not info.optional:
            axes[info.name] = chosen.get(info.name, info.time_axis)
            ranks[info.name] = len(info.shape)
    for name, value in graph.constants.items():
        axes[name], ranks[name] = None, value.ndim
    _walk(graph, model, axes, ranks, what)
    for info in graph.inputs:
        if not info.optional and axes[info.name] is None:
            raise ValueError(f"{what}: input {info.name!r} has no axis named 'steps', so there is nothing to stream "
                             "over (use model.forward)")
    return axes


def _walk(graph: Graph, model: Any, axes: dict, ranks: dict, what: str) -> None:
    nodes = graph.nodes
    for i, node in enumerate(nodes):
        try:
            if node.op == "If":
                _if(node, model, axes, ranks, what)
                continue
            if node.op == "Recurrent" and not graph.layers[node.attrs["layer"]].return_sequences \
                    and any(n.op != "Layer" for n in nodes[i + 1:]):
                raise _NotCausal("has return_sequences=False but feeds ops after it that need every step")
            outs = _rule(node, graph, [axes.get(n) for n in node.inputs], [ranks.get(n) for n in node.inputs])
        except _NotCausal as exc:
            raise ValueError(f"{what}: {node.where()} {exc}; the model cannot stream step by step "
                             "(use model.forward)") from None
        for name, (axis, rank) in zip(node.outputs, outs):
            if name:
                axes[name], ranks[name] = axis, rank


def _if(node: Node, model: Any, axes: dict, ranks: dict, what: str) -> None:
    if axes.get(node.inputs[0]) is not None:
        raise ValueError(f"{what}: {node.where()} branches on a value computed from the sequence; "
                         "the model cannot stream step by step (use model.forward)")
    found = []
    for b in ("then_branch", "else_branch"):
        sub_axes, sub_ranks = dict(axes), dict(ranks)
        for name, value in node.attrs[b].constants.items():
            sub_axes[name], sub_ranks[name] = None, value.ndim
        _walk(node.attrs[b], model, sub_axes, sub_ranks, what)
        found.append([(sub_axes.get(n), sub_ranks.get(n)) for n in node.attrs[b].outputs])
    if [a for a, _ in found[0]] != [a for a, _ in found[1]]:
        raise ValueError(f"{what}: {node.where()}'s branches put the time axis in different places; "
                         "the model cannot stream step by step (use model.forward)")
    for name, (axis, rank), (_, rank2) in zip(node.outputs, found[0], found[1]):
        if name:
            axes[name], ranks[name] = axis, rank if rank == rank2 else None


def _norm(axis: int, rank: int | None) -> int:
    if rank is None:
        raise _NotCausal("acts on an axis of a value whose rank is unknown here")
    return axis % rank if -rank <= axis < rank else axis


def _rule(node: Node, graph: Graph, t: list, r: list) -> list[tuple[Any, int | None]]:
    """(time axis, rank) of each output of one node, or _NotCausal saying why it cannot stream."""
    op = node.op
    a = node.attrs if op in ("Recurrent", "Layer") else _ops.check_attrs(op, node.attrs)
    timed = [x for x in t if x is not None]
    n_out = len(node.outputs)
    if op == "Recurrent":
        layer = graph.layers[a["layer"]]
        if layer.bidirectional:
            raise _NotCausal("is bidirectional; its reverse direction reads the sequence from its end")
        if layer.go_backwards:
            raise _NotCausal("runs backwards (go_backwards=True); it reads the sequence from its end")
        if t[0] != 1 or r[0] != 3:
            raise _NotCausal("reads a value whose time axis is not axis 1 of (batch, steps, features)")
        for j, name in ((2, "h0"), (3, "c0")):
            if len(node.inputs) > j and node.inputs[j] and not _zeros(graph, node.inputs[j]):
                raise _NotCausal(f"starts from a given initial state ({name}); a session starts from zeros "
                                 "and carries its own state")
        if len(node.inputs) > 1 and node.inputs[1] and not _optional_input(graph, node.inputs[1]):
            raise _NotCausal("takes sequence lengths, which a session (fed step by step) does not have")
        states = len(layer.state_shapes)
        return [(1, 3)] + [(FINAL, 3)] * states + [(1, 2)] * (n_out - 1 - states)
    if op == "Layer":
        if t[0] not in (1, None):
            raise _NotCausal("reads a value whose time axis is not axis 1")
        return [(1, 3), (1, 2)][:n_out]  # (batch, steps, features) and its mask
    if not timed:
        return [(None, rk) for rk in _ranks(op, a, r, n_out)]
    if FINAL in timed:
        if any(x not in (None, FINAL) for x in timed):
            raise _NotCausal("combines a final state with per-step values (their step-by-step values differ "
                             "from one run over the whole sequence)")
        return [(FINAL, rk) for rk in _ranks(op, a, r, n_out)]
    out_ranks = _ranks(op, a, r, n_out)
    return [(axis, rk) for axis, rk in zip(_time_rule(op, a, t, r, out_ranks, graph, node), out_ranks)]


# Ops that make zeros from zeros, whatever their other inputs and attributes.
_KEEP_ZEROS = {"Expand", "Tile", "Reshape", "Unsqueeze", "Squeeze", "Transpose", "Identity", "Cast", "Concat",
               "Slice", "Gather", "Flatten"}


def _zeros(graph: Graph, name: str, depth: int = 0) -> bool:
    """Whether a value is all zeros whatever the input (a zero initial state a forward builds itself)."""
    if name in graph.constants:
        return not graph.constants[name].any()
    node = next((n for n in graph.nodes if name in n.outputs), None)
    if node is None or depth > 16:
        return False
    if node.op == "ConstantOfShape":
        return float(node.attrs.get("value", 0.0)) == 0.0
    if node.op in _KEEP_ZEROS:
        data = node.inputs[:1] if node.op in ("Gather", "Slice") else [i for i in node.inputs if i]
        return all(_zeros(graph, i, depth + 1) for i in data)
    return False


def _optional_input(graph: Graph, name: str) -> bool:
    return any(v.name == name and v.optional for v in graph.inputs)


def _ranks(op: str, a: dict, r: list, n_out: int) -> list[int | None]:
    """Output ranks from input ranks (None where unknown)."""
    r0 = r[0] if r else None
    known = [x for x in r if x is not None]
    if op in _ELEMENTWISE or op in ("Softmax", "LogSoftmax", "LayerNormalization", "BatchNormalization",
                                    "Concat", "Split", "Slice", "Tile", "Conv", "Pad"):
        rk = max(known) if known and len(known) == len(r) else r0
        return [rk] * n_out
    if op == "Transpose":
        return [r0]
    if op == "Reshape":
        return [len(a["shape"])]
    if op == "Flatten":
        return [2]
    if op == "Squeeze":
        return [None if a.get("axes") is None or r0 is None else r0 - len(a["axes"])]
    if op == "Unsqueeze":
        return [None if r0 is None else r0 + len(a["axes"])]
    if op == "Gather":
        return [None if r0 is None or r[1] is None else r0 - 1 + r[1]]
    if op == "Expand":
        return [None if r0 is None else max(r0, len(a["shape"]))]
    if op == "Shape":
        return [1]
    if op.startswith("Reduce") or op == "ArgMax":
        if a.get("keepdims", 1):
            return [r0]
        axes = a.get("axes") if op != "ArgMax" else [a.get("axis", 0)]
        return [0 if axes is None else None if r0 is None else r0 - len(axes)]
    if op == "MatMul":
        if None in r[:2]:
            return [None]
        ra, rb = r[0], r[1]
        return [max(ra, rb) - (ra == 1) - (rb == 1) if ra > 1 or rb > 1 else 0]
    if op == "Gemm":
        return [2]
    if op == "Einsum":
        eq = a["equation"].replace(" ", "")
        return [len(eq.split("->")[1]) if "->" in eq and "." not in eq else None]
    return [None] * n_out


def _time_rule(op: str, a: dict, t: list, r: list, out_ranks: list, graph: Graph, node: Node) -> list:
    """Where the time axis of a per-step input ends up in each output, or _NotCausal."""
    t0, r0 = t[0], r[0]
    if op in _ELEMENTWISE:
        R = out_ranks[0]
        if R is None:
            raise _NotCausal("broadcasts values whose ranks are unknown here")
        where = {x + R - rk for x, rk in zip(t, r) if x is not None}
        if len(where) != 1:
            raise _NotCausal("combines values whose time axes do not line up")
        axis = where.pop()
        for name, x in zip(node.inputs, t):
            # A constant longer than 1 along the time axis would be broadcast against one chunk's steps.
            c = graph.constants.get(name)
            pos = axis - (R - c.ndim) if x is None and c is not None else -1
            if pos >= 0 and c.shape[pos] != 1:
                raise _NotCausal(f"broadcasts constant {name!r} of shape {c.shape} along the time axis")
        return [axis]
    if t0 is None:
        # Only a later input carries time (Gather's indices, MatMul's right side...).
        if op == "Gather" and t[1] is not None:
            return [_norm(a["axis"], r0) + t[1]]
        if op == "MatMul" and t[1] is not None and r[1] is not None and r[1] >= 2 and t[1] == r[1] - 1:
            return [out_ranks[0] - 1]
        if op == "Einsum":
            return [_einsum_time(a["equation"], t, r)]
        raise _NotCausal("reads the time axis in a way that mixes steps")
    if op == "Shape":
        start, end = a["start"], a["end"]
        if r0 is None or t0 in range(r0)[slice(start, end)]:
            raise _NotCausal("reads the number of steps, which differs between a chunk and the whole sequence")
        return [None]  # sizes of other axes (the batch) are the same in every chunk
    if op in ("Softmax", "LogSoftmax", "ArgMax"):
        if _norm(a["axis"], r0) == t0:
            raise _NotCausal("acts along the time axis")
        if op == "ArgMax" and not a["keepdims"] and _norm(a["axis"], r0) < t0:
            return [t0 - 1]
        return [t0]
    if op == "LayerNormalization":
        if t0 >= _norm(a["axis"], r0):
            raise _NotCausal("normalises over the time axis")
        return [t0] * len(out_ranks)
    if op == "BatchNormalization":
        if t0 == 1:
            raise _NotCausal("has its channels on the time axis")
        return [t0]
    if op == "Transpose":
        perm = a["perm"] if a["perm"] is not None else list(range(r0 - 1, -1, -1))
        return [perm.index(t0)]
    if op == "Reshape":
        shape = a["shape"]
        if len(shape) > t0 and all(s == 0 for s in shape[:t0 + 1]) and not a["allowzero"]:
            return [t0]
        raise _NotCausal("reshapes across the time axis")
    if op == "Flatten":
        axis = _norm(a["axis"], r0)
        if t0 == 0 and axis == 1:
            return [0]
        if t0 == axis == r0 - 1:
            return [1]
        raise _NotCausal("flattens the time axis with others")
    if op == "Squeeze":
        if a["axes"] is None:
            raise _NotCausal("squeezes every axis of size 1, which a one-step chunk's time axis is")
        axes = [_norm(x, r0) for x in a["axes"]]
        if t0 in axes:
            raise _NotCausal("squeezes the time axis")
        return [t0 - sum(x < t0 for x in axes)]
    if op == "Unsqueeze":
        R = out_ranks[0]
        axis = t0
        for x in sorted(_norm(x, R) for x in a["axes"]):
            if x <= axis:
                axis += 1
        return [axis]
    if op in ("Concat", "Split", "Slice", "Tile", "Pad", "Expand"):
        return [_shape_op_time(op, a, t, r, t0, r0, out_ranks)] * len(out_ranks)
    if op.startswith("Reduce"):
        if a["axes"] is None or t0 in [_norm(x, r0) for x in a["axes"]]:
            raise _NotCausal("reduces over the time axis (pooling over time)")
        return [t0 if a["keepdims"] else t0 - sum(_norm(x, r0) < t0 for x in a["axes"])]
    if op == "Gather":
        axis = _norm(a["axis"], r0)
        if axis == t0:
            raise _NotCausal("indexes along the time axis")
        if t[1] is not None:
            raise _NotCausal("gathers with per-step indices from per-step data")
        return [t0 if t0 < axis else t0 + (r[1] or 0) - 1] if r[1] is not None else _unknown()
    if op == "MatMul":
        if r0 is None or r[1] is None or r0 < 2:
            raise _NotCausal("multiplies along the time axis")
        if t0 == r0 - 1 or (t[1] is not None and t[1] >= r[1] - 2):
            raise _NotCausal("multiplies along the time axis")
        return [t0 + out_ranks[0] - r0]
    if op == "Gemm":
        if t0 != (1 if a["transA"] else 0) or any(x is not None for x in t[1:]):
            raise _NotCausal("multiplies along the time axis")
        return [0]
    if op == "Einsum":
        return [_einsum_time(a["equation"], t, r)]
    if op == "Conv":
        if t0 != 0:
            raise _NotCausal("convolves along the time axis (each output step needs the steps around it)")
        return [0]
    raise _NotCausal("needs the whole sequence")


def _unknown() -> list:
    raise _NotCausal("moves the time axis to a place unknown here")


def _shape_op_time(op: str, a: dict, t: list, r: list, t0: int, r0: int, out_ranks: list) -> int:
    if op == "Concat":
        if _norm(a["axis"], r0) == t0 or any(x != t0 for x in t):
            raise _NotCausal("concatenates along the time axis, or values without one")
        return t0
    if op == "Split":
        if _norm(a["axis"], r0) == t0:
            raise _NotCausal("splits the time axis")
        return t0
    if op == "Slice":
        axes = a["axes"] if a["axes"] is not None else list(range(len(a["starts"])))
        steps = a["steps"] or [1] * len(axes)
        for ax, s, e, st in zip(axes, a["starts"], a["ends"], steps):
            if _norm(ax, r0) == t0 and not (s == 0 and st == 1 and e >= 2 ** 31 - 1):
                raise _NotCausal("slices the time axis")
        return t0
    if op == "Tile":
        if a["repeats"][t0] != 1:
            raise _NotCausal("repeats along the time axis")
        return t0
    if op == "Pad":
        axes = [_norm(x, r0) for x in (a["axes"] if a["axes"] is not None else range(r0))]
        n = len(axes)
        for i, ax in enumerate(axes):
            if ax == t0 and (a["pads"][i] or a["pads"][i + n]):
                raise _NotCausal("pads the time axis")
        return t0
    # Expand
    R = out_ranks[0]
    axis = t0 + R - r0
    pos = axis - (R - len(a["shape"]))
    if pos >= 0 and a["shape"][pos] != 1:
        raise _NotCausal("expands along the time axis")
    return axis


def _einsum_time(equation: str, t: list, r: list) -> int:
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        raise _NotCausal("is an einsum without an explicit output or with '...', which hides the time axis")
    lhs, out = eq.split("->")
    letters = set()
    for term, x in zip(lhs.split(","), t):
        if x is not None:
            letters.add(term[x] if x < len(term) else "")
    if len(letters) != 1 or "" in letters or next(iter(letters)) not in out:
        raise _NotCausal("contracts or mixes the time axis")
    letter = letters.pop()
    for term, x in zip(lhs.split(","), t):
        if x is None and letter in term:
            raise _NotCausal("pairs the time axis with a value that has none")
    return out.index(letter)


# -- the runner ------------------------------------------------------------------------------------

class Streamer:
    """A model's plan bound to one session's (or pool's) buffers, for chunks of up to ``rows`` rows.

    ``run(inputs, states, started, out)`` runs the plan over inputs whose time axis holds the chunk's
    steps; states (per Recurrent node, arrays (1, n, width)) are updated in place; the first output
    is written into ``out`` where its last node can write there (else returned as a new array).
    """

    def __init__(self, model: Any, dtype: np.dtype, rows: int, what: str = "model.session()") -> None:
        self.model = model
        self.dtype = dtype
        self.rows = rows
        self.axes = time_axes(model, what)
        graph = model.graph
        self.plan = plan = model.plan(dtype)
        self.inputs = [(i, self.axes[v.name]) for i, v in enumerate(graph.inputs) if not v.optional]
        self.n_inputs = len(graph.inputs)
        self.output_axes = [self.axes.get(name) for name in graph.outputs]
        self.masked = any(len(n.inputs) == 5 for n in plan.recurrent)
        self.call = Call([], streaming=True)
        self.out_pos = plan.producer.get(plan.output_slots[0], -1)
        self.frames: dict[tuple, list] = {}  # per input shapes, the nodes' buffers
        self.single = len(self.inputs) == 1  # then the one fed input's shape is the key
        self.first = self.inputs[0][0] if self.inputs else 0
        # recurrent_layers follow plan.recurrent, If branches included.
        self.kernels = [layer._kernels[dtype] for layer in model.recurrent_layers]
        widths = [layer.output_size * 4 for layer in model.recurrent_layers]
        if model.is_chain:
            widths += [layer.output_size or 0 for layer in model.layers]
        widest = max([rows * w for w in widths] + [k.work_size(rows, 1) for k in self.kernels] + [1])
        self.max_steps = max(1, MAX_CHUNK_ELEMENTS // widest)

    def vocab(self) -> int:
        """For a model of token ids, the number of ids it takes (checked per stream by the pool); else 0."""
        if not self.model.takes_ids:
            return 0
        graph = self.model.graph
        n = id_range(graph, graph.inputs[self.first].name)
        if n is None:
            raise ValueError("model.pool(): the model's token ids are not only looked up in constant tables, so "
                             "the pool cannot check each stream's ids apart; use model.session()")
        return n

    def run(self, inputs: list, states: list, started: list | None, out: np.ndarray | None) -> list:
        call = self.call
        call.states = states
        call.started = started
        key = inputs[self.first].shape if self.single else tuple([None if x is None else x.shape for x in inputs])
        frame = self.frames.get(key)
        if frame is None:
            if len(self.frames) > 64:  # the pool's batch sizes times the chunk lengths seen
                self.frames.clear()
            frame = self.frames[key] = [None] * self.plan.positions
        call.frame = frame
        if out is None or self.out_pos < 0:
            return self.plan.run(inputs, call)
        # The last node writes into the caller's array where it fits (a chain's output always does).
        frame[self.out_pos] = out
        try:
            return self.plan.run(inputs, call)
        finally:
            frame[self.out_pos] = None

