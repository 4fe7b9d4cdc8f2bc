"""One plan, one runner: a Graph compiled once per dtype, run by forward, sessions, the pool and recording.

``Plan(graph, dtype)`` numbers the values, casts float constants once, binds each node to a small
function and folds nodes whose inputs are all constant. ``plan.run(inputs, call)`` runs the nodes in
order; ``call`` (a ``Call``) carries what differs between callers: the recurrent states (given, or
made per call), the sessions' output buffers and Keras-mask bookkeeping, and recording.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np

from . import _kernels, activations, ops as _ops
from ._base import SMALL_PRODUCT_FLOPS, one_blas_thread
from .graph import Graph, Node
from .layers import Dense, Dropout

def check_state(value: Any, layers: list, batch: int, what: str, check_dtype: Callable[[np.ndarray, str], None],
                allow_missing: bool = False) -> list[tuple[np.ndarray, ...] | None]:
    """Check a state given by a caller: one (h, c) or (h,) per recurrent layer, each (directions, batch, width).

    Returns the arrays (as given, not copied) per layer; an entry given as None stays None when
    ``allow_missing``. ``check_dtype(array, where)`` raises TypeError for a dtype the caller refuses.
    ``batch`` None accepts any batch size the entries agree on. Shared by Model.forward(initial_state=),
    Session.state and the pool's Stream.state.
    """
    if not isinstance(value, (list, tuple)) or len(value) != len(layers):
        raise ValueError(f"{what}: expected a list of {len(layers)} entries, one per recurrent layer")
    out: list[tuple[np.ndarray, ...] | None] = []
    for k, (layer, given) in enumerate(zip(layers, value)):
        if given is None and allow_missing:
            out.append(None)
            continue
        if isinstance(given, np.ndarray):
            given = (given,)
        names = ("h", "c")[: len(layer.state_shapes)]
        if not isinstance(given, (list, tuple)) or len(given) != len(names):
            raise ValueError(f"{what}[{k}]: expected a tuple ({', '.join(names)}) for {layer!r}")
        entry = []
        for name, arr, (D, W) in zip(names, given, layer.state_shapes):
            arr = np.asarray(arr)
            check_dtype(arr, f"{what}[{k}] {name}")
            B = arr.shape[1] if batch is None and arr.ndim == 3 else batch
            if arr.shape != (D, B, W):
                raise ValueError(f"{what}[{k}] {name}: expected shape {(D, batch or 'batch', W)} "
                                 f"(directions, batch, width), got {arr.shape}")
            entry.append(arr)
        out.append(tuple(entry))
    return out


@dataclass
class Call:
    """What one run of a plan needs besides its inputs.

    states: per Recurrent node a tuple of (D, B, width) arrays the kernels update in place, or None:
    then the node starts from its h0/c0 inputs (or zeros) and the new arrays are stored here.
    frame: a list (one entry per buffer position of the plan) that keeps the nodes' output arrays
    between runs of the same input shapes (sessions, the pool; the caller may put its own output
    array at the position of the node that makes the first output), or None: fresh arrays.
    started: per Recurrent node, (B,) bool: whether a row has had a valid step since its reset
    (streaming with Keras masks), or None. streaming: run chunk by chunk (no Keras arrangement of a
    recurrent output). record: a list that collects (layer, trace) per Recurrent node, run in NumPy.
    """

    states: list
    frame: list | None = None
    started: list | None = None
    streaming: bool = False
    record: list | None = None

    def alloc(self, pos: int, shape: tuple, dtype: np.dtype) -> np.ndarray:
        """The array a node writes its output at buffer position pos into (the frame's, when it fits)."""
        frame = self.frame
        if frame is None:
            return np.empty(shape, dtype)
        buf = frame[pos]
        if buf is None or buf.shape != shape:
            buf = frame[pos] = np.empty(shape, dtype)
        return buf


@dataclass
class Bound:
    """A node as the plan runs it: value slots in and out, buffer position, its step, and ``bind(ins)`` that
    makes the same step reading other slots (the specialiser's renaming); the branch plans of an If."""

    node: Node
    ins: list[int]
    outs: list[int]
    pos: int
    step: Callable
    bind: Callable[[list[int]], Callable] | None
    branches: list | None = None


class Plan:
    """A graph bound to one float dtype: value slots, node functions, constants cast once.

    ``specialise`` (the top-level plan only): run through ``lstm_engine.specialise``, which compiles the
    plan once more per input signature that repeats (shape-dependent nodes folded, If branches inlined).
    """

    def __init__(self, graph: Graph, dtype: np.dtype, outer: dict[str, int] | None = None,
                 outer_env: list | None = None, positions: list | None = None,
                 recurrent: list | None = None, specialise: bool = True) -> None:
        self.graph = graph
        # Buffer positions: two per node (its output, its scratch), numbered across If branches too.
        self._positions = positions = [0] if positions is None else positions
        self.dtype = np.dtype(dtype)
        # An If branch reads the enclosing graph's values by name and puts its own after them in the
        # same value list, so that the slots of both never collide.
        slots: dict[str, int] = dict(outer or {})
        env: list = [] if outer_env is None else outer_env

        def slot(name: str) -> int:
            if not name:
                return -1
            if name not in slots:
                slots[name] = len(env)
                env.append(None)
            return slots[name]

        self.input_slots = [slot(v.name) for v in graph.inputs]
        # Embedding outputs folded into the input product of the recurrent layer that reads them.
        self.tables = token_tables(graph, self.dtype) if outer is None else {}
        for name, value in graph.constants.items():
            env[slot(name)] = value.astype(self.dtype) if value.dtype.kind == "f" else value
        # One list for the graph and its If branches: a Recurrent node's index into Call.states is unique.
        self.recurrent: list[Node] = [] if recurrent is None else recurrent
        self.layers = graph.layers
        steps = []
        self.bound: list[Bound] = []  # the nodes left to run, as steps holds them
        self.producer: dict[int, int] = {}  # value slot -> the buffer position of the node that makes it
        for node in graph.nodes:
            ins = [slot(n) for n in node.inputs]
            outs = [slot(n) for n in node.outputs]
            pos = positions[0]
            positions[0] += 2
            for o in outs:
                self.producer[o] = pos
            bound = self._bind(node, pos, ins, outs, slots, env)
            step = bound.step
            if node.op not in ("Recurrent", "Layer", "If") and all(i < 0 or env[i] is not None for i in ins) \
                    and not any(i in self.input_slots for i in ins):
                # Inputs all constant: run once now (weights assembled from slices, shapes of constants).
                args = [env[i] for i in ins if i >= 0]
                if node.op in _ops.OPS and _ops.result_elements(
                        node.op, args, _ops.check_attrs(node.op, node.attrs)) > _ops.MAX_ELEMENTS:
                    raise ValueError(f"{node.where()}: folding its constant inputs would make an array of more "
                                     f"than {_ops.MAX_ELEMENTS} elements")
                step(env, None)
                continue
            steps.append(step)
            self.bound.append(bound)
        self.steps = steps
        self.slots = slots
        self.env = env
        self.output_slots = [slot(n) for n in graph.outputs]
        self.specialiser = None
        if specialise and outer is None:
            from .specialise import Specialiser

            self.specialiser = Specialiser.of(self)

    @property
    def positions(self) -> int:
        """How many buffer positions a Call.frame for this plan holds."""
        return self._positions[0]

    # -- binding ------------------------------------------------------------------------------
    def _bind(self, node: Node, pos: int, ins: list[int], outs: list[int], slots: dict, env: list) -> Bound:
        dtype = self.dtype
        if node.op == "Recurrent":
            k = len(self.recurrent)
            self.recurrent.append(node)
            layer = self.layers[node.attrs["layer"]]
            table = self.tables.get(node.inputs[0])

            def bind(ins: list[int]) -> Callable:
                return _recurrent_step(node, layer, k, pos, ins, outs, dtype, table)
        elif node.op == "Layer":
            layer = self.layers[node.attrs["layer"]]
            folded = node.outputs[0] in self.tables

            def bind(ins: list[int]) -> Callable:
                return _layer_step(node, layer, pos, ins, outs, dtype, folded)
        elif node.op == "If":
            branches = [Plan(node.attrs[b], dtype, slots, env, self._positions, self.recurrent)
                        for b in ("then_branch", "else_branch")]
            return Bound(node, ins, outs, pos, _if_step(node, branches, ins, outs), None, branches)
        else:
            def bind(ins: list[int]) -> Callable:
                return _op_step(node, ins, outs, dtype)
        return Bound(node, ins, outs, pos, bind(ins), bind)

    # -- running ------------------------------------------------------------------------------
    def run(self, inputs: list, call: Call) -> list:
        """Run the graph on inputs (one per graph input, None for an optional one left out); its outputs."""
        if self.specialiser is not None:
            return self.specialiser.run(inputs, call)
        return self.run_general(inputs, call)

    def run_general(self, inputs: list, call: Call) -> list:
        """run, node by node as bound at load (what a specialised run must equal)."""
        env = self.env.copy()
        for s, x in zip(self.input_slots, inputs):
            env[s] = x
        for step in self.steps:
            step(env, call)
        return [env[s] for s in self.output_slots]

    def run_branch(self, env: list, call: Call | None) -> list:
        """Run as a branch of an If: env is the enclosing graph's value list, which holds this one's too."""
        for step in self.steps:
            step(env, call)
        return [env[s] for s in self.output_slots]


def _op_step(node: Node, ins: list[int], outs: list[int], dtype: np.dtype) -> Callable:
    """An ONNX op of lstm_engine.ops reading and writing value slots."""
    spec = _ops.OPS[node.op]
    kw = _ops.check_attrs(node.op, node.attrs)
    if node.op == "Cast":
        kw["_float"] = dtype
    elif node.op == "Split":
        kw["_outputs"] = len(outs)
    fn = spec.fn
    where = node.where()
    if spec.inputs[1] < _ops.VARIADIC:
        ins = ins + [-1] * (spec.inputs[1] - len(ins))  # optional inputs left out at the end

    def step(env: list, call: Call | None) -> None:
        args = [env[i] if i >= 0 else None for i in ins]
        try:
            res = fn(*args, **kw)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
        if len(outs) == 1:
            env[outs[0]] = res if not isinstance(res, tuple) else res[0]
        else:
            for o, r in zip(outs, res):
                if o >= 0:
                    env[o] = r
    return step


def branch_index(cond: np.ndarray, where: str) -> int:
    """Which branch of an If a condition takes: 0 (then) or 1 (else)."""
    if cond.size != 1 or cond.dtype.kind not in "biu":
        raise ValueError(f"{where}: the condition must be one bool, got {cond.dtype} {cond.shape}")
    return 0 if bool(cond.reshape(())) else 1


def _if_step(node: Node, branches: list[Plan], ins: list[int], outs: list[int]) -> Callable:
    where = node.where()

    def step(env: list, call: Call | None) -> None:
        branch = branches[branch_index(env[ins[0]], where)]
        for o, r in zip(outs, branch.run_branch(env, call)):
            if o >= 0:
                env[o] = r
    return step


def _layer_step(node: Node, layer: Any, pos: int, ins: list[int], outs: list[int], dtype: np.dtype,
                folded: bool = False) -> Callable:
    """A non-recurrent engine layer of a chain, with its Keras mask in and out.

    folded: an Embedding whose lookup the next recurrent layer's table does (token_tables); its
    output value then holds the ids themselves.
    """
    ix, im = ins[0], (ins[1] if len(ins) > 1 else -1)
    oy, om = outs[0], (outs[1] if len(outs) > 1 else -1)
    if isinstance(layer, Dropout):
        def step(env: list, call: Call) -> None:
            env[oy] = env[ix]
            if om >= 0:
                env[om] = env[im] if im >= 0 else None
        return step
    if getattr(layer, "accepts_ids", False):
        table = layer._by_dtype[dtype]["weight"]  # None when quantized: rows widened as they are looked up
        width = layer.embedding_dim
        mask_zero = layer.mask_zero

        def step(env: list, call: Call) -> None:
            ids = env[ix]
            if folded:
                env[oy] = ids
            else:
                frame = call.frame
                y = None if frame is None else frame[pos]
                if y is None or y.shape[:-1] != ids.shape:
                    y = call.alloc(pos, ids.shape + (width,), dtype)
                if table is None:
                    y[...] = layer.embed(ids, dtype)
                else:
                    table.take(ids, axis=0, out=y)
                env[oy] = y
            if om >= 0:
                mask = env[im] if im >= 0 else None
                if mask_zero:
                    valid = call.alloc(pos + 1, ids.shape, np.bool_)
                    np.not_equal(ids, 0, out=valid)
                    if mask is not None:
                        valid &= mask
                    mask = valid
                env[om] = mask
        return step
    if isinstance(layer, Dense) and layer.quantization is None:  # a quantized head runs its own forward
        w = layer._by_dtype[dtype]
        # weight.T is a view: BLAS reads the (out, in) weight transposed, nothing is copied.
        weight, bias, act = w["weight"], w["bias"], layer.activation
        wT = weight.T
        width = wT.shape[1]
        one_row_gemv = dtype == np.float32

        def step(env: list, call: Call) -> None:
            x = env[ix]
            shape = x.shape[:-1] + (width,)
            frame = call.frame
            y = None if frame is None else frame[pos]
            if y is None or y.shape != shape:
                y = call.alloc(pos, shape, dtype)
            y2 = y.reshape(-1, width)
            x2 = x.reshape(-1, x.shape[-1])
            if one_row_gemv and x2.shape[0] == 1 and y2.flags.c_contiguous:
                # One row (a batch-1 step): the engine's GEMV on its own threads; a 2-thread BLAS call
                # waits for a core on a busy machine (10000 x 512: 2.2 ms against 15 ms).
                _kernels.dense_row(weight, np.ascontiguousarray(x2[0]), bias, y2[0], layer.threads)
            else:
                with one_blas_thread() if 2 * y2.size * x2.shape[1] < SMALL_PRODUCT_FLOPS else nullcontext():
                    np.matmul(x2, wT, out=y2)
                if bias is not None:
                    y2 += bias
            activations.apply(act, y2)
            env[oy] = y
            if om >= 0:
                env[om] = env[im] if im >= 0 else None
        return step

    def step(env: list, call: Call) -> None:
        mask = env[im] if im >= 0 else None
        y, m = layer.forward(env[ix], mask)
        env[oy] = y if y.dtype == dtype else y.astype(dtype)
        if om >= 0:
            env[om] = m
    return step


def check_lengths(lengths: Any, B: int, T: int, where: str = "lengths", low: int = 1) -> np.ndarray:
    """Packed-sequence lengths: integers (B,) in low..T."""
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        raise TypeError(f"{where}: expected integers, got dtype {lengths.dtype}")
    if lengths.shape != (B,):
        raise ValueError(f"{where}: expected shape ({B},), one length per batch row, got {lengths.shape}")
    bad = np.flatnonzero((lengths < low) | (lengths > T))
    if bad.size:
        raise ValueError(f"{where}: every length must be in {low}..{T} (the number of steps); "
                         f"row {bad[0]} has {lengths[bad[0]]}")
    return lengths


def initial_state(layer: Any, dtype: np.dtype, given: list, B: int, where: str) -> tuple:
    """A recurrent node's starting state, (h, c) or (h,): copies (the kernels update them in place) of the given
    h0 and c0, each checked to be (directions, B, width), zeros where None."""
    state = []
    for arr, name, (D, W) in zip(given, ("h0", "c0"), layer.state_shapes):
        if arr is None:
            state.append(np.zeros((D, B, W), dtype))
            continue
        if arr.shape != (D, B, W):
            raise ValueError(f"{where}: {name} must have shape {(D, B, W)} (directions, batch, width), "
                             f"got {arr.shape}")
        state.append(np.array(arr, dtype=dtype, order="C"))
    return tuple(state)


def keras_arranged(layer: Any) -> bool:
    """Whether a recurrent layer's raw outputs need Keras's arrangement (go_backwards, last step, merge)."""
    return layer.go_backwards or not layer.return_sequences or (layer.bidirectional and layer.merge_mode != "concat")


def _recurrent_step(node: Node, layer: Any, k: int, pos: int, ins: list[int], outs: list[int],
                    dtype: np.dtype, fold: tuple | None = None) -> Callable:
    """Run one recurrent layer through its compiled kernel (or, recording, the NumPy twin in gates).

    fold: (embedding, table) when the layer reads token ids through an Embedding folded into it
    (token_tables): its input value holds the ids and the kernel looks each step's projection up.
    """
    ins = ins + [-1] * (5 - len(ins))
    ix, il, ih, ic, im = ins
    n_states = len(layer.state_shapes)
    oy, o_states, om = outs[0], outs[1:1 + n_states], (outs[1 + n_states] if len(outs) > 1 + n_states else -1)
    kernel = layer._kernels.get(dtype)
    I = layer.input_size
    width = layer.num_directions * layer._state_out
    where = node.where()
    keras = keras_arranged(layer)
    zero_output = layer.zero_output_for_mask
    init = [i for i in (ih, ic)[:n_states]]
    embedding, table = fold if fold is not None else (None, None)
    run = None if kernel is None else kernel.run if table is None else partial(kernel.run, table=table)
    # Packed lengths on the C kernels: rows sorted longest first, each step runs only the rows still going.
    shrink = kernel is not None and kernel.fast

    def initial(env: list, B: int) -> tuple:
        return initial_state(layer, dtype, [env[i] if i >= 0 else None for i in init], B, where)

    plain = il < 0 and im < 0 and not keras
    state_outs = [(o, j) for j, o in enumerate(o_states) if o >= 0]

    def step(env: list, call: Call) -> None:
        x = env[ix]
        if table is not None:
            if x.dtype != np.intp or not x.flags.c_contiguous:
                x = np.ascontiguousarray(x, dtype=np.intp)
            if x.ndim != 2 or x.shape[1] == 0:
                raise ValueError(f"{where}: token ids must have shape (batch, steps >= 1), got {x.shape}")
        elif x.dtype is not dtype or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=dtype)
        shape = x.shape
        if table is None and (len(shape) != 3 or shape[2] != I or shape[1] == 0):
            raise ValueError(f"{where}: x must have shape (batch, steps >= 1, {I}), got {x.shape}")
        B, T = shape[0], shape[1]
        state = call.states[k]
        if state is None:
            state = call.states[k] = initial(env, B)
        record = call.record
        lent = None
        if record is None:
            frame = call.frame
            raw = None if frame is None else frame[pos]
            if raw is None or raw.shape != (B, T, width):
                raw = call.alloc(pos, (B, T, width), dtype)
            # A frame serves one set of input shapes, so its scratch, once made, fits. Without one
            # (Model.forward) the layer lends its spare: a fresh 32 MB per call spent 16 % of the batch
            # workload zeroing pages.
            work = None if frame is None else frame[pos + 1]
            if work is None:
                if frame is None:
                    work = lent = layer.take_work(kernel, B, T)
                else:
                    work = call.alloc(pos + 1, (kernel.work_size(B, T),), dtype)
        if plain and record is None and call.started is None:
            # The common case (chains, sessions): no lengths, no mask, nothing to arrange.
            run(x, raw, state[0], state[-1], None, work, zero_output)
            if lent is not None:
                layer.give_work(lent)
            env[oy] = raw
            for o, j in state_outs:
                env[o] = state[j]
            return
        lengths = env[il] if il >= 0 else None
        kmask = None
        valid = env[im] if im >= 0 else None
        if lengths is not None:
            lengths = check_lengths(lengths, B, T, f"{where}: lengths", low=0)
            if shrink and valid is None and record is None and call.started is None:
                _run_packed(run, x, raw, state, lengths, work)
                if lent is not None:
                    layer.give_work(lent)
                _finish(layer, env, call, lengths, state, raw, keras, oy, om, state_outs, T)
                return
            packed = np.arange(T) < lengths[:, None]
            valid = packed if valid is None else valid & packed
        if valid is not None:
            kmask = valid.view(np.uint8) if valid.dtype == np.bool_ and valid.flags.c_contiguous else \
                np.ascontiguousarray(valid, dtype=np.uint8)
        zero_masked = lengths is not None or zero_output
        if record is not None:
            from .gates import run_layer

            if table is not None:
                x = embedding.embed(x, dtype)
            raw, trace = run_layer(layer, x, kmask, state, zero_masked)
            record.append((layer, trace))
        else:
            if call.started is not None:
                _run_masked(run, x, raw, state, kmask, work, zero_masked, call.started[k], B, T)
            else:
                run(x, raw, state[0], state[-1], kmask, work, zero_masked)
            if lent is not None:
                layer.give_work(lent)
        _finish(layer, env, call, lengths, state, raw, keras, oy, om, state_outs, T, valid)
    return step


def _finish(layer: Any, env: list, call: Call, lengths: np.ndarray | None, state: tuple, raw: np.ndarray,
            keras: bool, oy: int, om: int, state_outs: list, T: int, valid: Any = False) -> None:
    """A recurrent node's outputs: zero states for rows of length 0, Keras's arrangement, the mask."""
    if lengths is not None and not lengths.all():
        # A row of length 0 (ONNX allows it) ends with zero states, as onnxruntime gives.
        for s in state:
            s[:, lengths == 0] = 0
    if valid is False:  # packed lengths run without a mask: made only where one is needed
        valid = np.arange(T) < lengths[:, None] if keras or om >= 0 else None
    if keras and not call.streaming:
        y, mask = layer.arrange(raw, valid)
    else:
        y, mask = raw, valid
    env[oy] = y
    for o, j in state_outs:
        env[o] = state[j]
    if om >= 0:
        env[om] = mask


def _run_packed(run: Callable, x: np.ndarray, raw: np.ndarray, state: tuple, lengths: np.ndarray,
                work: np.ndarray) -> None:
    """A padded batch with lengths, as PyTorch's packed sequences run it: rows sorted longest first, and
    each step computes only the rows whose length it has not reached, so the batch costs what the sum
    of its lengths costs. Outputs land in the caller's row order; states are sorted and put back."""
    lens = lengths.astype(np.int32)
    if lens.size < 2 or (lens[1:] <= lens[:-1]).all():
        run(x, raw, state[0], state[-1], None, work, True, lengths=lens)
        return
    order = np.argsort(-lens, kind="stable").astype(np.int32)
    sorted_state = [np.take(s, order, axis=1) for s in state]
    run(x[order], raw, sorted_state[0], sorted_state[-1], None, work, True, lengths=lens[order], y_rows=order)
    for s, t in zip(state, sorted_state):
        s[:, order] = t


def _run_masked(run: Callable, x: np.ndarray, dst: np.ndarray, state: tuple, mask: np.ndarray | None,
                work: np.ndarray, zero_masked: bool, started: np.ndarray, n: int, T: int) -> None:
    """Run a recurrent layer of a model with masks, carrying 'the previous output' across calls.

    Within one call the kernel repeats the previous output at a masked step (Keras), but at a
    chunk's first steps it writes zeros. The previous output is h (the state is carried through
    masked steps) once the row has had a valid step since its reset, so those leading steps are
    patched from h as it was before the call.
    """
    h, c = state[0], state[-1]
    if mask is None:
        run(x, dst, h, c, None, work, zero_masked)
        started[:] = True
        return
    valid = mask.view(np.bool_)
    any_valid = valid.any(axis=1)
    fix = None
    if not zero_masked:
        lead = np.where(any_valid, valid.argmax(axis=1), T)
        fix = np.flatnonzero((lead > 0) & started)
        saved = h[0, fix].copy() if fix.size else None
    run(x, dst, h, c, mask, work, zero_masked)
    if fix is not None and fix.size:
        for j, b in enumerate(fix):
            dst[b, : lead[b]] = saved[j]
    started |= any_valid


# -- specialisations of a chain ------------------------------------------------------------------

# An Embedding folds into the next recurrent layer when its table of projections (vocab x gates x hidden
# floats) stays this small: character and phoneme vocabularies, up to ~4000 tokens at hidden 256. A word
# vocabulary's table would add tens of MB per model for a product the lookup saves only once per step.
MAX_TABLE_BYTES = 16 << 20


def _reads(graph: Graph) -> dict[str, int]:
    """How many times each value is read: by nodes (If branches included) and as a graph output."""
    count: dict[str, int] = {}
    for name in graph.outputs:
        count[name] = count.get(name, 0) + 1
    for node in graph.nodes:
        for name in node.inputs:
            count[name] = count.get(name, 0) + 1
        for b in ("then_branch", "else_branch"):
            if node.op == "If":
                for name, n in _reads(node.attrs[b]).items():
                    count[name] = count.get(name, 0) + n
    return count


def token_tables(graph: Graph, dtype: np.dtype) -> dict[str, tuple]:
    """Embeddings folded into the input product of the recurrent layer that alone reads them.

    Per Embedding output name, (embedding, table): the table holds W_ih . e + bias for every token's
    vector e, computed once by the layer's own projection (RecurrentKernel.input_table), so a step
    looks its projection up instead of embedding the id and multiplying: the same sums. Only for
    layers on the C kernels (float32 LSTM without projection, GRU with reset after), float weights,
    and tables up to MAX_TABLE_BYTES; every other case embeds and multiplies as before.
    """
    reads = _reads(graph)
    readers = {n.inputs[0]: n for n in graph.nodes if n.op == "Recurrent" and n.inputs}
    tables: dict[str, tuple] = {}
    for node in graph.nodes:
        if node.op != "Layer" or not getattr(graph.layers[node.attrs["layer"]], "accepts_ids", False):
            continue
        name = node.outputs[0]
        reader = readers.get(name)
        embedding = graph.layers[node.attrs["layer"]]
        weight = embedding._by_dtype.get(dtype, {}).get("weight")
        if reader is None or reads.get(name) != 1 or weight is None:
            continue
        layer = graph.layers[reader.attrs["layer"]]
        kernel = layer._kernels.get(dtype)
        if kernel is None or not kernel.fast or kernel.input_size != weight.shape[1]:
            continue
        hp = -(-kernel.hidden_size // 16) * 16
        if kernel.num_directions * weight.shape[0] * kernel.num_gates * hp * 4 > MAX_TABLE_BYTES:
            continue
        tables[name] = (embedding, kernel.input_table(np.ascontiguousarray(weight)))
    return tables


def chain_step(plan: Plan, states: list, rows: int) -> Any:
    """The plan of a chain [Embedding ->] recurrent layers [-> Dense heads] as one compiled step over
    ``rows`` rows bound to ``states`` (a session's), or None where the chain has anything else.

    The step runs what the plan's own steps run for one step (the same kernels, packed weights and
    token table, or the Embedding's rows where no table folds it, quantized ones widened as
    Embedding.embed does), in one call into C: a session's step() through it costs little more than
    the recurrent step itself. Heads: float32 Dense with linear or relu activation, up to 8 rows
    (each row is a GEMV on the engine's threads; a quantized head's rows one packed product); a
    chain of recurrent layers alone in any dtype.
    """
    from .layers import Dense

    graph = plan.graph
    if len(plan.steps) != len(graph.nodes) or not graph.inputs \
            or not all(v.optional for v in graph.inputs[1:]):
        return None
    prev = graph.inputs[0].name
    table = embedding = None
    kernels: list = []
    heads: list = []
    input_size = 0
    for i, node in enumerate(graph.nodes):
        if node.op not in ("Recurrent", "Layer") or node.inputs[0] != prev:
            return None
        layer = graph.layers[node.attrs["layer"]]
        if node.op == "Recurrent":
            optional = [n for n in node.inputs[1:] if n]
            if heads or len(node.inputs) == 5 or any(not any(v.name == n and v.optional for v in graph.inputs)
                                                     for n in optional):
                return None
            if layer.bidirectional or layer.go_backwards or not layer.return_sequences:
                return None
            if not kernels:
                fold = plan.tables.get(node.inputs[0])
                table = None if fold is None else fold[1]
                if table is not None:
                    embedding = None
                input_size = layer.input_size
            kernels.append(layer._kernels.get(plan.dtype))
        elif i == 0 and getattr(layer, "accepts_ids", False):
            if layer.mask_zero:
                return None
            embedding = _embedding_rows(layer, plan.dtype)
        elif isinstance(layer, Dropout):
            pass
        elif isinstance(layer, Dense) and kernels and rows <= 8 \
                and layer.activation in ("linear", "relu") and plan.dtype == np.float32:
            w = layer._by_dtype[plan.dtype]
            weight = layer._packed if layer.quantization is not None else np.ascontiguousarray(w["weight"])
            heads.append((weight, w["bias"], layer.activation == "relu"))
        else:
            return None
        prev = node.outputs[0]
    if graph.outputs != [prev] or not kernels or None in kernels:
        return None
    return _kernels.ChainStep(rows, table, kernels, states, heads, input_size, embedding)


def _embedding_rows(layer: Any, dtype: np.dtype) -> tuple:
    """What ChainStep looks an Embedding's rows up in: (kind, weight, int8 scales or None)."""
    q = layer.quantization
    if q is None:
        return "float", np.ascontiguousarray(layer._by_dtype[dtype]["weight"]), None
    scale = q.scales.get("weight")
    return (q.format, np.ascontiguousarray(q.stored["weight"].view(np.int8 if q.format == "int8" else np.uint16)),
            None if scale is None else np.ascontiguousarray(scale, np.float32))
