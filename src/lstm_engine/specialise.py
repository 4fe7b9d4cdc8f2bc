"""A plan compiled once more per input signature: what depends only on shapes folded, If branches inlined.

ONNX graphs exported from PyTorch carry many nodes that depend on the inputs' shapes only (Shape → Gather →
Unsqueeze → Concat chains, Squeeze-if-the-axis-is-1 Ifs) and If nodes on a small integer input (silero-vad's
sample rate). They cannot be folded at load, where the shapes are unknown, and running them node by node costs more
than the model's arithmetic on a streamed chunk.

``Specialiser.run(inputs, call)`` keys each call on its signature: the inputs' shapes and dtypes, and the values of
the small integer inputs that decide an If or a ConstantOfShape (found at load by walking back from them; a Shape
node's output depends on its input's shape only). The second call with a signature traces one run of the general
plan, which validates and raises exactly as it always does, and marks every value *static* (a function of the
signature: constants, keyed inputs, shapes, and nodes of static inputs), *shaped* (its shape is a function of the
signature) or *dynamic*. Static nodes are folded into the signature's value list, an If on a static condition is
replaced by the branch it took, Identity (and a Cast to the same dtype) renames its input, steps whose values nothing
reads are dropped, and the rest become one flat list of steps, bound to the shapes the trace saw where that lets them
skip checks and precompute (Slice indices, a chain of views as one step, Conv's weight laid out for the engine's
kernel once, a following Relu applied by that kernel as it stores). Validation that depends on the
values (indices from data, integer division, lengths, recurrent shapes) stays in the steps. A signature that differs
in anything (a shape, a dtype, a keyed value) gets its own entry, so nothing a specialisation assumed is ever reused
where it does not hold. Sessions, the pool, forward, run and recording all reach this through ``Plan.run``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import numpy as np

from . import _kernels, ops as _ops

# A value is a function of the signature (its value is known), of which only the shape is known, or neither.
STATIC, SHAPED, DYNAMIC = 2, 1, 0
# Integer inputs of at most this many elements that decide an If or a shape are part of the key, by value.
KEYED_ELEMENTS = 16
# The call with a signature that traces it (the first ones run the general plan).
TRACE_AT = 2
# Signatures remembered (seen once) and compiled, per plan; all are dropped past these.
MAX_SEEN = 256
MAX_COMPILED = 16
# Ops never folded: they keep state (Recurrent) or belong to the model's layers.
_STATEFUL = ("Recurrent", "Layer")


@dataclass
class Specialised:
    """One signature's program: constants and folded values, the inputs' slots, the steps, the outputs' slots."""

    template: list
    input_slots: list[int]
    steps: list[Callable]
    output_slots: list[int]
    static_outputs: list[int]  # positions in output_slots of folded values (copied out, so callers own them)

    def run(self, inputs: list, call: Any) -> list:
        env = self.template.copy()
        for s, x in zip(self.input_slots, inputs):
            env[s] = x
        # One errstate for the whole run: the steps call NumPy directly (the general ops set it each).
        with np.errstate(all="ignore"):
            for step in self.steps:
                step(env, call)
        out = [env[s] for s in self.output_slots]
        for j in self.static_outputs:
            out[j] = np.array(out[j], copy=True)
        return out


class Specialiser:
    """A top-level plan's signatures and their compiled programs."""

    def __init__(self, plan: Any, keyed: list[int]) -> None:
        self.plan = plan
        self.keyed = keyed  # indices into plan.input_slots whose small values are part of the key
        self.seen: dict[tuple, int] = {}
        self.compiled: dict[tuple, Specialised] = {}

    @classmethod
    def of(cls, plan: Any) -> "Specialiser | None":
        """The plan's specialiser, or None when every node is a layer (chains: nothing to fold or inline)."""
        if all(b.node.op in _STATEFUL for b in _walk(plan)):
            return None
        return cls(plan, _keyed_inputs(plan))

    def key(self, inputs: list) -> tuple:
        key = tuple([None if x is None else (x.shape, x.dtype) for x in inputs])
        if self.keyed:
            key += tuple([None if inputs[i] is None or inputs[i].size > KEYED_ELEMENTS else inputs[i].tobytes()
                          for i in self.keyed])
        return key

    def run(self, inputs: list, call: Any) -> list:
        key = self.key(inputs)
        program = self.compiled.get(key)
        if program is not None:
            return program.run(inputs, call)
        seen = self.seen.get(key, 0) + 1
        if seen < TRACE_AT:
            # A signature met for the first time runs the general plan: a model fed ever-new shapes pays no tracing.
            if len(self.seen) >= MAX_SEEN:
                self.seen.clear()
            self.seen[key] = seen
            return self.plan.run_general(inputs, call)
        keyed_slots = {self.plan.input_slots[i] for i, k in zip(self.keyed, key[len(inputs):]) if k is not None}
        outputs, program = _Trace(self.plan, keyed_slots).run(inputs, call)
        if len(self.compiled) >= MAX_COMPILED:
            self.compiled.clear()
        self.compiled[key] = program
        return outputs


def _walk(plan: Any):
    """Every bound node of the plan and of its If branches, recursively."""
    for b in plan.bound:
        yield b
        for branch in b.branches or ():
            yield from _walk(branch)


def _branch_reads(plan: Any) -> set[int]:
    """The slots a plan run as an If branch reads (its nodes' inputs and its outputs), recursively."""
    reads = set(plan.output_slots)
    for b in _walk(plan):
        reads.update(i for i in b.ins if i >= 0)
        for branch in b.branches or ():
            reads.update(branch.output_slots)
    return reads


def _keyed_inputs(plan: Any) -> list[int]:
    """The integer inputs whose values reach an If's condition or a ConstantOfShape's shape (not through a Shape)."""
    producer: dict[int, Any] = {}
    roots: list[int] = []
    for b in _walk(plan):
        for o in b.outs:
            producer[o] = b
        if b.node.op == "If":
            roots.append(b.ins[0])
        elif b.node.op == "ConstantOfShape":
            roots.append(b.ins[0])
    seen: set[int] = set()
    while roots:
        s = roots.pop()
        if s < 0 or s in seen:
            continue
        seen.add(s)
        b = producer.get(s)
        if b is None or b.node.op == "Shape":
            continue
        roots.extend(b.ins)
        for branch in b.branches or ():
            roots.extend(branch.output_slots)
    return [i for i, (s, info) in enumerate(zip(plan.input_slots, plan.graph.inputs))
            if s in seen and info.dtype != "float"]


class _Trace:
    """One run of the general plan that records the program of its signature."""

    def __init__(self, plan: Any, keyed_slots: set[int]) -> None:
        self.plan = plan
        self.keyed_slots = keyed_slots
        self.alias: dict[int, int] = {}  # a slot an Identity made -> the slot that holds its value
        self.entries: list[list] = []  # [bound node or None, mapped ins, outs, builder(kw) -> step]

    def run(self, inputs: list, call: Any) -> tuple[list, Specialised]:
        plan = self.plan
        env = self.env = plan.env.copy()
        self.flag = [STATIC if v is not None else DYNAMIC for v in env]
        for s, x in zip(plan.input_slots, inputs):
            env[s] = x
            self.flag[s] = STATIC if x is None or s in self.keyed_slots else SHAPED
        self.call = call
        self.walk(plan)
        program = self.program()
        outputs = [env[s] for s in plan.output_slots]
        for j in program.static_outputs:  # the program's template holds these arrays
            outputs[j] = np.array(outputs[j], copy=True)
        return outputs, program

    def source(self, s: int) -> int:
        return self.alias.get(s, s) if s >= 0 else -1

    def rename(self, o: int, s: int) -> None:
        """Value o is value s (Identity, an If's output, a Cast to the same dtype)."""
        if o < 0:
            return
        self.env[o] = self.env[s]
        self.flag[o] = self.flag[s]
        if self.flag[s] != STATIC:
            self.alias[o] = self.source(s)

    def walk(self, plan: Any) -> None:
        env, flag = self.env, self.flag
        for b in plan.bound:
            op = b.node.op
            ins = b.ins
            if op == "If":
                if flag[ins[0]] == STATIC:
                    from .plan import branch_index

                    branch = b.branches[branch_index(env[ins[0]], b.node.where())]
                    self.walk(branch)
                    for o, r in zip(b.outs, branch.output_slots):
                        self.rename(o, r)
                    continue
                # A condition known only at run time: the If runs as bound, its branches reading the slots
                # they were bound to, so values renamed away are copied back there first.
                b.step(env, self.call)
                reads = sorted(_branch_reads(b.branches[0]) | _branch_reads(b.branches[1]))
                for s in reads:
                    if s in self.alias:
                        self.entries.append([None, [self.alias[s]], [s], partial(_copy_step, self.alias[s], s)])
                self.entries.append([b, list(ins) + reads, b.outs, partial(_bound_step, b)])
                for o in b.outs:
                    if o >= 0:
                        flag[o] = DYNAMIC
                continue
            b.step(env, self.call)
            flags = [flag[i] for i in ins if i >= 0]
            # A Shape of a value whose shape the signature fixes is known, like a node of known inputs.
            if op not in _STATEFUL and (all(f == STATIC for f in flags) or (op == "Shape" and flags[0] >= SHAPED)):
                for o in b.outs:
                    if o >= 0:
                        flag[o] = STATIC
                continue
            # A Cast to the dtype its input already has (known for a value of known shape and dtype) copies.
            if op == "Identity" or (op == "Cast" and flags[0] >= SHAPED and env[b.outs[0]].dtype == env[ins[0]].dtype):
                self.rename(b.outs[0], ins[0])
                continue
            shaped = all(f >= SHAPED for f in flags)
            mapped = [self.source(i) for i in ins]
            make = _fast(b, mapped, env, flag, plan.dtype) if shaped and op not in _STATEFUL else None
            if make is None and op == "Recurrent" and shaped:
                make = _recurrent_maker(plan, b, mapped, env)
            if make is None:
                make = partial(b.bind, mapped)
            self.entries.append([b, mapped, b.outs, make])
            out_flag = SHAPED if shaped and op != "ConstantOfShape" else DYNAMIC
            for o in b.outs:
                if o >= 0:
                    flag[o] = out_flag

    def program(self) -> Specialised:
        plan, flag = self.plan, self.flag
        outputs = [self.source(s) for s in plan.output_slots]
        # Steps whose values nothing reads are dropped (an LSTM's unused sequence output reshaped); recurrent
        # layers and Ifs stay, for their state.
        needed = set(outputs)
        entries = []
        for entry in reversed(self.entries):
            b, ins, outs, make = entry
            if (b is not None and b.node.op in ("Recurrent", "Layer", "If")) or any(o in needed for o in outs):
                needed.update(i for i in ins if i >= 0)
                entries.append(entry)
        entries.reverse()
        reads: dict[int, int] = {}
        for b, ins, outs, make in entries:
            for i in ins:
                reads[i] = reads.get(i, 0) + 1
        for s in outputs:
            reads[s] = reads.get(s, 0) + 1
        entries = _fold_magnitudes(_fold_pads(entries, reads), reads, self.env, flag)
        steps = []
        made_by: dict[int, int] = {}  # slot -> index in steps of the view that made it, while it may still grow
        k = 0
        while k < len(entries):
            b, ins, outs, make = entries[k]
            nxt = entries[k + 1] if k + 1 < len(entries) else None
            # A Relu right after the Conv that made its only input is applied by the kernel as it stores.
            if isinstance(make, _Conv) and nxt is not None and nxt[0] is not None \
                    and nxt[0].node.op == "Relu" and nxt[1] == [outs[0]] and reads.get(outs[0]) == 1:
                make.relu_out = nxt[2][0]
                steps.append(make)
                k += 2
                continue
            if isinstance(make, _View):
                j = made_by.pop(make.i, None)
                if j is not None and reads.get(make.i) == 1:
                    # A view of a view nothing else reads: one step does both.
                    prev = steps[j]
                    steps[j] = _View(prev.i, make.o, prev.chain + make.chain)
                else:
                    steps.append(_View(make.i, make.o, list(make.chain)))
                    j = len(steps) - 1
                made_by[make.o] = j
                k += 1
                continue
            steps.append(make)
            k += 1
        steps = [make() for make in _absorb_views(steps, reads)]
        template = [v if f == STATIC else None for v, f in zip(self.env, flag)]
        for s in plan.input_slots:
            template[s] = None
        static_outputs = [j for j, s in enumerate(outputs) if flag[s] == STATIC and s not in plan.input_slots
                          and isinstance(template[s], np.ndarray)]
        return Specialised(template, list(plan.input_slots), steps, outputs, static_outputs)


def _fold_pads(entries: list, reads: dict[int, int]) -> list:
    """Entries with each reflect Pad along the last axis that only a Conv reads (directly, or through one reshape
    that keeps that axis, as silero-vad's STFT input) folded into that Conv's window gather: no padded copy.
    A reshape that keeps the last axis regroups whole rows, so the unpadded input reshaped alike holds the same
    rows, and the kernel mirrors each row's ends exactly as the Pad's copies do."""
    made: dict[int, int] = {}  # slot -> index in entries of what made it
    for j, (b, ins, outs, make) in enumerate(entries):
        for o in outs:
            made[o] = j
    dropped: set[int] = set()
    for j, (b, ins, outs, make) in enumerate(entries):
        if not isinstance(make, _Conv) or make.pads != [0, 0]:
            continue
        src = ins[0]
        chain = []
        while src in made and reads.get(src) == 1:
            p = made[src]
            pmake = entries[p][3]
            if isinstance(pmake, _View) and not chain and len(pmake.chain) == 1 and pmake.chain[0][0] == _RESHAPE:
                chain.append(p)
                src = pmake.i
                continue
            if isinstance(pmake, _Pad) and pmake.axis == pmake.ndim - 1 and pmake.shape[-1] == make.shape_in[-1]:
                make.padded = (pmake, make.shape_in)
                dropped.update(chain + [p])
                entries[j] = [b, [pmake.i] + ins[1:], outs, make]
            break
    return [e for j, e in enumerate(entries) if j not in dropped]


def _fold_magnitudes(entries: list, reads: dict[int, int], env: list, flag: list) -> list:
    """Entries with each Sqrt(Add(Pow(a, 2), Pow(b, 2))) of float32 values, its middle values read by nothing
    else, run as one _Magnitude (an STFT's magnitude, as silero-vad computes it from the real and imaginary halves
    of its Conv's output): the same roundings as the four NumPy calls, in one."""
    made = {o: j for j, e in enumerate(entries) for o in e[2]}

    def only(slot: int, op: str) -> int | None:
        """The entry (index) of op that made slot, when nothing else reads slot."""
        j = made.get(slot)
        if j is None or reads.get(slot) != 1 or entries[j][0] is None or entries[j][0].node.op != op:
            return None
        return j

    dropped: set[int] = set()
    for j, (b, ins, outs, make) in enumerate(entries):
        if b is None or b.node.op != "Sqrt" or env[outs[0]].dtype != np.float32:
            continue
        add = only(ins[0], "Add")
        if add is None:
            continue
        pows = [only(i, "Pow") for i in entries[add][1]]
        if None in pows or len(pows) != 2:
            continue
        bases = []
        for p in pows:
            pb = entries[p][0]
            exponent, base = env[pb.ins[1]], env[pb.ins[0]]
            if flag[pb.ins[1]] != STATIC or exponent.size != 1 or float(exponent.reshape(())) != 2.0 \
                    or not isinstance(base, np.ndarray) or base.dtype != np.float32:
                break
            bases.append(entries[p][1][0])
        else:
            if env[entries[pows[0]][0].ins[0]].shape == env[entries[pows[1]][0].ins[0]].shape:
                entries[j] = [b, bases, outs, _Magnitude(bases, outs[0])]
                dropped.update(pows + [add])
    return [e for j, e in enumerate(entries) if j not in dropped]


class _Magnitude:
    """sqrt(a² + b²) of two float32 values of one shape in one kernel call (_kernels.magnitude); ``views``: the
    view chains that make a and b, applied here (_absorb_views)."""

    VIEWED = (0, 1)

    def __init__(self, ins: list[int], o: int) -> None:
        self.ins, self.o = ins, o
        self.views: dict[int, tuple[int, tuple]] = {}

    def __call__(self) -> Callable:
        (sa, ca), (sb, cb) = [self.views.get(p, (self.ins[p], ())) for p in self.VIEWED]
        o, magnitude, contiguous = self.o, _kernels.magnitude, np.ascontiguousarray

        def step(env: list, call: Any) -> None:
            a, b = _apply(env[sa], ca), _apply(env[sb], cb)
            env[o] = magnitude(a if a.flags.c_contiguous else contiguous(a),
                               b if b.flags.c_contiguous else contiguous(b))
        return step


def _copy_step(src: int, dst: int) -> Callable:
    def step(env: list, call: Any) -> None:
        env[dst] = env[src]
    return step


def _bound_step(b: Any) -> Callable:
    return b.step


# -- steps bound to one signature's shapes -------------------------------------------------------------
# Each maker gets the bound node, its inputs' slots (renamed), the traced values and their flags, and returns a
# maker of the step (or None: the general step). The general op ran on these very shapes in the trace, so
# the checks that depend on shapes and dtypes only have passed; what depends on values is kept.

_RESHAPE, _TRANSPOSE, _INDEX = range(3)


class _View:
    """A chain of views (reshape, transpose, basic index) from slot i to slot o, bound to the traced shapes;
    consecutive views whose middle values nothing else reads become one step."""

    def __init__(self, i: int, o: int, chain: list[tuple[int, Any]]) -> None:
        self.i, self.o, self.chain = i, o, chain

    def __call__(self) -> Callable:
        i, o = self.i, self.o
        if len(self.chain) == 1:
            kind, arg = self.chain[0]
            if kind == _RESHAPE:
                def step(env: list, call: Any) -> None:
                    env[o] = env[i].reshape(arg)
            elif kind == _TRANSPOSE:
                def step(env: list, call: Any) -> None:
                    env[o] = env[i].transpose(arg)
            else:
                def step(env: list, call: Any) -> None:
                    env[o] = env[i][arg]
            return step
        chain = tuple(self.chain)

        def step(env: list, call: Any) -> None:
            env[o] = _apply(env[i], chain)
        return step


def _apply(v: np.ndarray, chain: tuple) -> np.ndarray:
    """A view chain (_View's) applied to v."""
    for kind, arg in chain:
        v = v.reshape(arg) if kind == _RESHAPE else v.transpose(arg) if kind == _TRANSPOSE else v[arg]
    return v


def _absorb_views(steps: list, reads: dict[int, int]) -> list:
    """Steps with each view chain that only a _Recurrent (its x, h0, c0) or a _Magnitude reads applied by that
    step: a step of its own cost more than the view (silero-vad's LSTM input and state halves, its STFT halves)."""
    made = {s.o: j for j, s in enumerate(steps) if isinstance(s, _View)}
    dropped: set[int] = set()
    for s in steps:
        if not isinstance(s, (_Recurrent, _Magnitude)):
            continue
        for p in s.VIEWED:
            j = made.get(s.ins[p])
            if s.ins[p] >= 0 and j is not None and reads.get(s.ins[p]) == 1 and j not in dropped:
                s.views[p] = (steps[j].i, tuple(steps[j].chain))
                dropped.add(j)
    return [s for j, s in enumerate(steps) if j not in dropped]


class _Recurrent:
    """A recurrent layer's plain run (no lengths, mask, token table or Keras arrangement) bound to its traced
    shapes: only what a call can change is looked at. ``views``: per input position (x, h0, c0), the slot and view
    chain it is made from (_absorb_views). A call that records, keeps a frame (sessions, the pool) or streams
    with Keras masks takes the node's general step, given the viewed inputs."""

    VIEWED = (0, 2, 3)

    def __init__(self, b: Any, ins: list[int], layer: Any, kernel: Any, k: int, shape: tuple,
                 dtype: np.dtype) -> None:
        self.b, self.ins, self.layer, self.kernel, self.k, self.shape, self.dtype = b, ins, layer, kernel, k, shape, dtype
        self.views: dict[int, tuple[int, tuple]] = {}

    def __call__(self) -> Callable:
        from .plan import initial_state

        layer, kernel, k, dtype = self.layer, self.kernel, self.k, self.dtype
        general = self.b.bind(self.ins)
        where = self.b.node.where()
        n = len(layer.state_shapes)
        # (slot the general step reads, slot the value comes from, its view chain) for x, h0, c0.
        fed = [(self.ins[p], *self.views.get(p, (self.ins[p], ()))) for p in self.VIEWED[:1 + n]]
        outs = self.b.outs
        oy, state_outs = outs[0], [(o, j) for j, o in enumerate(outs[1:1 + n]) if o >= 0]
        B, T = self.shape[0], self.shape[1]
        y_shape = (B, T, layer.num_directions * layer._state_out)
        run, zero_output = kernel.run, layer.zero_output_for_mask

        def step(env: list, call: Any) -> None:
            values = [None if src < 0 else _apply(env[src], chain) if chain else env[src] for _, src, chain in fed]
            if call.frame is not None or call.record is not None or call.started is not None:
                for (slot, _, _), v in zip(fed, values):
                    if slot >= 0:
                        env[slot] = v
                general(env, call)
                return
            x = values[0]
            state = call.states[k]
            if state is None:
                state = call.states[k] = initial_state(layer, dtype, values[1:], B, where)
            if not x.flags.c_contiguous:
                x = np.ascontiguousarray(x)
            y = np.empty(y_shape, dtype)
            work = layer.take_work(kernel, B, T)
            run(x, y, state[0], state[-1], None, work, zero_output)
            layer.give_work(work)
            env[oy] = y
            for o, j in state_outs:
                env[o] = state[j]
        return step


def _recurrent_maker(plan: Any, b: Any, ins: list[int], env: list) -> _Recurrent | None:
    """A _Recurrent where the node runs the general step's plain path for every call that keeps no frame."""
    from .plan import keras_arranged

    node = b.node
    layer = plan.layers[node.attrs["layer"]]
    kernel = layer._kernels.get(plan.dtype)
    ins = list(ins) + [-1] * (5 - len(ins))
    n = len(layer.state_shapes)
    x = env[b.ins[0]]
    if kernel is None or ins[1] >= 0 or ins[4] >= 0 or keras_arranged(layer) or node.inputs[0] in plan.tables \
            or (len(b.outs) > 1 + n and b.outs[1 + n] >= 0) or not isinstance(x, np.ndarray) \
            or x.dtype != plan.dtype or x.ndim != 3:
        return None
    k = next(j for j, r in enumerate(plan.recurrent) if r is node)
    return _Recurrent(b, ins, layer, kernel, k, x.shape, plan.dtype)


def _unary_step(f: Callable, i: int, o: int, where: str) -> Callable:
    def step(env: list, call: Any) -> None:
        try:
            env[o] = f(env[i])
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
    return step


def _binary_step(f: Callable, a: int, b: int, o: int, where: str) -> Callable:
    def step(env: list, call: Any) -> None:
        try:
            env[o] = f(env[a], env[b])
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{where}: {exc}") from None
    return step


def _fast(b: Any, ins: list[int], env: list, flag: list, dtype: np.dtype) -> Callable | None:
    node = b.node
    op = node.op
    outs = b.outs
    if len(outs) != 1 or outs[0] < 0:
        return None
    o = outs[0]
    where = node.where()
    kw = _ops.check_attrs(op, node.attrs)
    y = env[o]
    if not isinstance(y, np.ndarray):
        return None
    if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten"):
        return _View(ins[0], o, [(_RESHAPE, y.shape)])
    if op == "Transpose":
        x = env[b.ins[0]]
        perm = tuple(kw["perm"]) if kw["perm"] is not None else tuple(reversed(range(x.ndim)))
        return _View(ins[0], o, [(_TRANSPOSE, perm)])
    if op == "Slice":
        shape = env[b.ins[0]].shape
        index = _ops.slice_index(shape, kw["starts"], kw["ends"], kw["axes"], kw["steps"])
        # A slice that keeps every element of its input (silero-vad's batch of one, its four STFT frames) views
        # the same elements as the input itself: nothing to apply.
        whole = all(isinstance(s, slice) and s.indices(n) == (0, n, 1) for s, n in zip(index, shape))
        return _View(ins[0], o, [] if whole and len(index) <= len(shape) else [(_INDEX, index)])
    if op == "Gather" and flag[b.ins[1]] == STATIC:
        x, idx = env[b.ins[0]], env[b.ins[1]]
        axis = kw["axis"] % x.ndim
        n = x.shape[axis]
        idx = np.where(idx < 0, idx + n, idx)
        if idx.ndim == 0:
            # One index: a view (nothing writes into a node's input), kept an array by the Ellipsis.
            return _View(ins[0], o, [(_INDEX, (slice(None),) * axis + (int(idx), Ellipsis))])
        i = ins[0]

        def make() -> Callable:
            def step(env: list, call: Any) -> None:
                env[o] = np.take(env[i], idx, axis=axis)
            return step
        return make
    if op == "Concat":
        x = env[b.ins[0]]
        axis = kw["axis"] % x.ndim
        srcs = list(ins)

        def make() -> Callable:
            def step(env: list, call: Any) -> None:
                env[o] = np.concatenate([env[s] for s in srcs], axis=axis)
            return step
        return make
    if op == "Pad":
        return _pad_maker(b, ins, env, kw, o)
    if op == "Conv":
        return _conv_maker(b, ins, env, flag, kw, o)
    if op in ("Add", "Sub", "Mul") and y.dtype.kind == "f":
        ufunc = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op]
        return _binary_maker(ufunc, ins, env, flag, b.ins, o, where)
    if op == "Pow" and y.dtype.kind == "f" and flag[b.ins[1]] == STATIC:
        # As ops.pow_: the exponent in the base's dtype (cast once here).
        exponent = env[b.ins[1]].astype(y.dtype)
        i = ins[0]
        return lambda: _pow_step(exponent, i, o)
    if op in ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin") and y.dtype == env[b.ins[0]].dtype \
            and kw["axes"] and all(env[b.ins[0]].shape[a] == 1 for a in kw["axes"]):
        # Over axes of one element each, the result is the input itself (x / 1 == x), reshaped.
        return _View(ins[0], o, [(_RESHAPE, y.shape)])
    if op == "ReduceMean" and y.dtype.kind == "f" and kw["axes"]:
        return _mean_maker(env[b.ins[0]], kw, ins[0], o)
    if op == "Relu" and y.dtype.kind == "f":
        zero = y.dtype.type(0)  # as ops' Relu, its zero made once
        i = ins[0]

        def make() -> Callable:
            def step(env: list, call: Any) -> None:
                env[o] = np.maximum(env[i], zero)
            return step
        return make
    if op == "Sigmoid" and y.dtype == env[b.ins[0]].dtype and y.dtype in (np.float32, np.float64):
        # ops' Sigmoid is scipy's expit, which keeps these dtypes (its cast back is a no-op): called directly.
        expit = _ops.special().expit
        return lambda: _unary_step(expit, ins[0], o, where)
    if op in _UFUNCS and y.dtype.kind == "f":
        f = _UFUNCS[op]
        i = ins[0]
        return lambda: _unary_step(f, i, o, where)
    spec = _ops.OPS[op]
    if spec.outputs != (1, 1) or spec.inputs != (len(ins), len(ins)) or len(ins) > 2 or min(ins) < 0:
        return None
    # Any other op of fixed arity: its own function (all its checks) with the attributes bound once.
    if op in ("Cast", "ConstantOfShape"):
        kw["_float"] = dtype
    f = partial(spec.fn, **kw)
    if len(ins) == 1:
        return lambda: _unary_step(f, ins[0], o, where)
    return lambda: _binary_step(f, ins[0], ins[1], o, where)


def _pow_step(exponent: np.ndarray, i: int, o: int) -> Callable:
    def step(env: list, call: Any) -> None:
        env[o] = np.power(env[i], exponent)
    return step


_UFUNCS = {"Sqrt": np.sqrt, "Exp": np.exp, "Log": np.log, "Tanh": np.tanh, "Neg": np.negative, "Abs": np.abs,
           "Reciprocal": np.reciprocal}


def _mean_maker(x: np.ndarray, kw: dict, i: int, o: int) -> Callable:
    """np.mean's own two calls (a sum, then a division by the count as an intp), without its checks."""
    axes = tuple(a % x.ndim for a in kw["axes"])
    keepdims = bool(kw["keepdims"])
    count = np.intp(np.prod([x.shape[a] for a in axes]))

    def make() -> Callable:
        def step(env: list, call: Any) -> None:
            s = np.add.reduce(env[i], axis=axes, keepdims=keepdims)
            if isinstance(s, np.ndarray):
                env[o] = np.true_divide(s, count, out=s, casting="unsafe")
            else:
                env[o] = np.asarray(s.dtype.type(s / count))
        return step
    return make


def _binary_maker(ufunc: Callable, ins: list[int], env: list, flag: list, orig: list[int], o: int,
                  where: str) -> Callable:
    a, b = ins
    if flag[orig[1]] == STATIC:
        const = env[orig[1]]

        def make() -> Callable:
            def step(env: list, call: Any) -> None:
                env[o] = ufunc(env[a], const)
            return step
        return make
    if flag[orig[0]] == STATIC:
        const = env[orig[0]]

        def make() -> Callable:
            def step(env: list, call: Any) -> None:
                env[o] = ufunc(const, env[b])
            return step
        return make
    return lambda: _binary_step(ufunc, a, b, o, where)


class _Pad:
    """A reflect Pad along one axis, its slices made once; ``axis``, ``lo``, ``hi`` and the input slot ``i`` let a
    Conv reading it (through a reshape) fold it into its window gather (_fold_pads)."""

    def __init__(self, i: int, o: int, x: np.ndarray, y: np.ndarray, axis: int, lo: int, hi: int) -> None:
        self.i, self.o, self.axis, self.lo, self.hi = i, o, axis, lo, hi
        self.ndim, self.shape, self.dtype, self.n = x.ndim, y.shape, y.dtype, x.shape[axis]

    def __call__(self) -> Callable:
        # The same three copies as ops.pad's one-axis reflect.
        a, lo, hi, n = self.axis, self.lo, self.hi, self.n
        pre = (slice(None),) * a
        mid = pre + (slice(lo, lo + n),)
        left, left_src = pre + (slice(0, lo),), pre + (slice(lo, 0, -1),)
        right, right_src = pre + (slice(lo + n, None),), pre + (slice(n - 2, n - 2 - hi if hi < n - 1 else None, -1),)
        shape, dtype, i, o = self.shape, self.dtype, self.i, self.o

        def step(env: list, call: Any) -> None:
            x = env[i]
            out = np.empty(shape, dtype)
            out[mid] = x
            out[left] = x[left_src]
            out[right] = x[right_src]
            env[o] = out
        return step


def _pad_maker(b: Any, ins: list[int], env: list, kw: dict, o: int) -> _Pad | None:
    x, y = env[b.ins[0]], env[o]
    if kw["mode"] != "reflect" or any(p < 0 for p in kw["pads"]):
        return None
    axes = list(range(x.ndim)) if kw["axes"] is None else [a % x.ndim for a in kw["axes"]]
    pads = kw["pads"]
    widths = [(0, 0)] * x.ndim
    for j, a in enumerate(axes):
        widths[a] = (pads[j], pads[j + len(axes)])
    padded = [a for a, (lo, hi) in enumerate(widths) if lo or hi]
    if len(padded) != 1:
        return None
    a = padded[0]
    return _Pad(ins[0], o, x, y, a, *widths[a])


class _Conv:
    """A float32 Conv of constant weights through the engine's kernels, made once (conv_kernels).

    ``relu_out``: a following Relu the kernel applies as it stores, the step then writing that slot.
    ``padded``: a reflect Pad (a _Pad) along the last axis of the value this Conv reads through a reshape to
    ``shape`` that keeps that axis: the step reads the Pad's input reshaped alike, and the kernel mirrors at the
    ends as the Pad would (_fold_pads)."""

    def __init__(self, xin: int, o: int, w: np.ndarray, bias: np.ndarray | None, kw: dict, shape_in: tuple,
                 shape: tuple) -> None:
        self.xin, self.o, self.w, self.bias, self.kw = xin, o, w, bias, kw
        self.shape_in, self.shape = shape_in, shape
        self.relu_out: int | None = None
        self.padded: tuple[_Pad, tuple] | None = None

    @property
    def pads(self) -> list[int]:
        return self.kw["pads"] or [0, 0]

    def __call__(self) -> Callable:
        kw = self.kw
        group = kw["group"]
        dst = self.o if self.relu_out is None else self.relu_out
        relu = self.relu_out is not None
        pads, reflect, xin, view = self.pads, False, self.xin, None
        if self.padded is not None:
            pad, view = self.padded
            pads, reflect, xin = [pad.lo, pad.hi], True, pad.i
            view = view[:-1] + (pad.n,)
        kernels = _ops.conv_kernels(self.w, self.bias, group, (kw["strides"] or [1])[0], (kw["dilations"] or [1])[0],
                                    pads, relu, reflect)
        if group != 1:
            M, L_out = self.shape[1], self.shape[2]

            def step(env: list, call: Any) -> None:
                x = env[xin]
                env[dst] = _ops.conv1d_f32(x if view is None else x.reshape(view), kernels, M, L_out)
            return step
        conv = kernels[0]
        if view is not None:
            def step(env: list, call: Any) -> None:
                x = env[xin].reshape(view)
                if x.strides[2] != 4:  # strides are not in the signature: checked per call
                    x = np.ascontiguousarray(x)
                env[dst] = conv(x)
            return step

        def step(env: list, call: Any) -> None:
            x = env[xin]
            if x.shape[2] > 1 and x.strides[2] != 4:
                x = np.ascontiguousarray(x)
            env[dst] = conv(x)
        return step


def _conv_maker(b: Any, ins: list[int], env: list, flag: list, kw: dict, o: int) -> _Conv | None:
    x, w, y = env[b.ins[0]], env[b.ins[1]], env[o]
    has_bias = len(b.ins) > 2 and b.ins[2] >= 0
    bias = env[b.ins[2]] if has_bias else None
    if flag[b.ins[1]] != STATIC or (has_bias and flag[b.ins[2]] != STATIC) or y.dtype != np.float32 \
            or x.dtype != np.float32 or w.dtype != np.float32 or (has_bias and bias.dtype != np.float32):
        return None
    return _Conv(ins[0], o, w, bias, kw, x.shape, y.shape)
