"""Model: a graph of engine ops (a chain of layers is the common case), with input checks and the state in and out."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from . import _kernels
from ._base import FLOAT_DTYPES, Layer, as_real_array
from ._threads import default_threads
from .graph import Graph, Node, ValueInfo, build_structure
from .layers import Dense
from .plan import Call, Plan, check_lengths, check_state

if TYPE_CHECKING:  # imported by the methods that make them
    from .pool import StreamPool
    from .session import Session

__all__ = ["Model", "chain_graph"]


def chain_graph(layers: list) -> Graph:
    """The graph of a chain: each layer feeds the next; ``lengths`` (optional) and Keras masks flow along.

    Recurrent layers become ``Recurrent`` nodes, the others ``Layer`` nodes. The mask values exist only
    when a layer can make a mask (Embedding(mask_zero=True), Masking).
    """
    takes_ids = bool(getattr(layers[0], "accepts_ids", False))
    masked = any(getattr(layer, "mask_zero", False) or type(layer).__name__ == "Masking" for layer in layers)
    first = None if takes_ids else next((layer.input_size for layer in layers if layer.input_size is not None), None)
    inputs = [ValueInfo("x", "int64" if takes_ids else "float", ["batch", "steps"] + ([] if takes_ids else [first])),
              ValueInfo("lengths", "int64", ["batch"], optional=True)]
    nodes = []
    x, mask = "x", ""
    for i, layer in enumerate(layers):
        y = f"layers.{i}"
        new_mask = f"layers.{i}.mask" if masked else ""
        if layer.is_recurrent:
            states = [""] * len(layer.state_shapes)  # a chain's states come out of forward, not as values
            ins = [x, "lengths", "", "", mask] if masked else [x, "lengths"]
            nodes.append(Node("Recurrent", ins, [y] + states + ([new_mask] if masked else []), {"layer": i},
                              f"layers.{i}", f"layer {i} ({layer!r})"))
        else:
            nodes.append(Node("Layer", [x, mask] if masked else [x], [y, new_mask] if masked else [y],
                              {"layer": i}, f"layers.{i}", f"layer {i} ({layer!r})"))
        x, mask = y, new_mask
    return Graph(inputs, [x], nodes, {}, list(layers), 0, {})


class Model:
    """A model: a chain of layers, ``Model([Embedding, LSTM, Dense])``, or a ``Graph``, ``Model(graph)``.

    ``forward(x, lengths=None, initial_state=None)`` returns ``(y, state)``. For a chain x is
    batch-major — (B, T, F) floats, or (B, T) token ids when the first layer is an Embedding — and y
    (B, T, out) (or (B, out) after a layer with return_sequences=False). For a graph x is its input
    (a tuple for several) and y has the structure the source returned. ``state`` is one tuple per
    recurrent layer (Recurrent node, in graph order; None for one in an If branch that did not run): (h, c)
    for LSTM, (h,) otherwise, each array (directions, B, width). ``run(feeds)`` runs a graph by its input
    and output names.
    """

    def __init__(self, layers: Sequence[Layer] | Graph, *, metadata: dict | None = None,
                 threads: int | None = None) -> None:
        if isinstance(layers, Graph):
            graph = layers
            graph.validate()
            self.is_chain = False
            layers = list(graph.layers)
            used = [layers[n.attrs["layer"]] for n in graph.nodes if n.op in ("Recurrent", "Layer")]
            dtypes = [dt for dt in FLOAT_DTYPES if all(dt in layer.dtypes for layer in used)]
        else:
            layers = self._check_chain(layers)
            graph = chain_graph(layers)
            self.is_chain = True
            dtypes = [dt for dt in layers[0].dtypes if all(dt in layer.dtypes for layer in layers)]
        if not dtypes:
            raise ValueError("Model: the layers keep weights in no common dtype; build them with the same dtype=")
        self.graph = graph
        self.layers = layers
        self.dtypes = tuple(dtypes)
        self.metadata = dict(metadata if metadata is not None else graph.metadata)
        self._plans: dict[np.dtype, Plan] = {}
        self._checked_feeds: dict[tuple, np.dtype] = {}  # input signatures that passed _check_feeds
        self._plan_lock = threading.Lock()
        self._input_names = dict.fromkeys(v.name for v in graph.inputs)  # in order, for run's feeds
        self.recurrent_layers = [self._layer_of(n) for n in self.plan(self.dtype).recurrent]
        self._describe_io()
        self.threads = threads

    def _layer_of(self, node: Node) -> Any:
        """The layer a Recurrent node runs (its own graph's, also inside If branches)."""
        def find(graph: Graph) -> Any:
            if any(n is node for n in graph.nodes):
                return graph.layers[node.attrs["layer"]]
            for n in graph.nodes:
                if n.op == "If":
                    for b in ("then_branch", "else_branch"):
                        found = find(n.attrs[b])
                        if found is not None:
                            return found
            return None
        return find(self.graph)

    @staticmethod
    def _check_chain(layers: Sequence[Layer]) -> list:
        if isinstance(layers, Layer):
            raise TypeError(f"Model: expected a list of layers, got one {type(layers).__name__}; "
                            f"write Model([layer]) for a model of one layer")
        if not hasattr(layers, "__iter__"):
            raise TypeError(f"Model: expected a list of layers or a Graph, got {type(layers).__name__}")
        layers = list(layers)
        if not layers:
            raise ValueError("Model: expected at least one layer")
        size = None
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Model: layer {i} is a {type(layer).__name__}, not an lstm_engine layer")
            if getattr(layer, "accepts_ids", False) and i:
                raise ValueError(f"Model: layer {i} ({layer!r}) takes token ids, so it must come first")
            if layer.input_size is not None and size is not None and layer.input_size != size:
                raise ValueError(f"Model: layer {i} ({layer!r}) expects {layer.input_size} features, "
                                 f"but the layer before it gives {size}")
            size = layer.output_size if layer.output_size is not None else size
        return layers

    def _describe_io(self) -> None:
        """takes_ids, input_size and output_size: what a single-input model takes and gives."""
        if self.is_chain:
            layers = self.layers
            self.takes_ids = bool(getattr(layers[0], "accepts_ids", False))
            # Width-preserving layers (Masking, Dropout...) have no size: the first layer that has one decides.
            self.input_size = None if self.takes_ids else next(
                (layer.input_size for layer in layers if layer.input_size is not None), None)
            size = None
            for layer in layers:
                size = layer.output_size if layer.output_size is not None else size
            self.output_size = size
            return
        fed = [v for v in self.graph.inputs if not v.optional]
        one = fed[0] if len(fed) == 1 else None
        self.takes_ids = one is not None and one.dtype in ("int64", "int32")
        last = one.shape[-1] if one is not None and one.shape else None
        self.input_size = last if isinstance(last, int) and not self.takes_ids else None
        self.output_size = None

    def plan(self, dtype: np.dtype) -> Plan:
        """The graph compiled for one dtype (once; shared by forward, sessions and the pool)."""
        plan = self._plans.get(dtype)
        if plan is None:
            with self._plan_lock:
                plan = self._plans.get(dtype)
                if plan is None:
                    plan = self._plans[dtype] = Plan(self.graph, dtype)
        return plan

    @property
    def threads(self) -> int:
        """Threads one call may use, the engine's own and BLAS's (default: every core of the process,
        at most ``OMP_NUM_THREADS`` when that is set, as Ray and Dask workers do).

        Sessions of the model use it too. Two calls running at once in different Python threads
        each get one core when the engine's workers are busy with the other. It is a ceiling: while
        the process may use fewer cores, or other processes hold them, a call runs on fewer threads
        (``lstm_engine.cpu_info()["pool"]`` counts how many did and why).
        """
        return self._threads

    @threads.setter
    def threads(self, threads: int | None) -> None:
        if threads is None:
            threads = default_threads()
        if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
            raise TypeError(f"threads: expected an int or None, got {type(threads).__name__}")
        if threads < 1:
            raise ValueError(f"threads: expected at least 1, got {threads}")
        self._threads = int(threads)
        for layer in self.layers + self.recurrent_layers:
            for kernel in getattr(layer, "_kernels", {}).values():
                kernel.threads = self._threads
        for layer in self.layers:
            if isinstance(layer, Dense):  # its one-row GEMV and quantized products run on the engine's threads
                layer.threads = self._threads

    @property
    def dtype(self) -> np.dtype:
        """The dtype inputs are cast to with ``cast=True`` (the first one the model keeps)."""
        return self.dtypes[0]

    def __repr__(self) -> str:
        if self.is_chain:
            inner = ",\n".join(f"  {layer!r}" for layer in self.layers)
            return f"Model([\n{inner}\n])"
        g = self.graph
        ops = ", ".join(n.op for n in g.nodes)
        return f"Model(graph: inputs {[v.name for v in g.inputs]} -> outputs {g.outputs}; {len(g.nodes)} nodes: {ops})"

    # -- input checks -------------------------------------------------------------------------
    def _run_dtype(self, x: Any, cast: bool, name: str = "x") -> tuple[np.ndarray, np.dtype]:
        """A float input as an array, and the dtype of the run it selects (its own, or self.dtype with cast)."""
        if not isinstance(x, np.ndarray):
            x = as_real_array(x, self.dtype, name)
        # x's own dtype object when it is already native: NumPy converts (copies) for an equal but other dtype
        # object, and model.run's feed-signature cache needs the feeds passed through as they are.
        native = x.dtype if x.dtype.kind != "f" or x.dtype.isnative else x.dtype.newbyteorder("=")
        if native not in self.dtypes:
            if not (cast and x.dtype.kind in "fiu" and x.dtype.kind != "b"):
                kept = " or ".join(str(d) for d in self.dtypes)
                if cast:
                    raise TypeError(f"{name}: dtype {x.dtype} cannot be cast to {self.dtype}; expected real numbers "
                                    "(floats or integers)")
                raise TypeError(f"{name}: dtype {x.dtype}, but this model runs {kept}; pass cast=True to convert, "
                                f"or build the model with dtype=(np.float32, np.float64)")
            native = self.dtype
        return x, native

    def _check_chain_x(self, x: Any, cast: bool) -> np.ndarray:
        """A chain's input as a C-contiguous array of a dtype this model runs (token ids stay integers)."""
        if self.takes_ids:
            ids = np.asarray(x)
            if ids.ndim != 2:
                raise ValueError(f"x: expected token ids of shape (batch, steps), got shape {ids.shape}")
            self.layers[0].check_ids(ids)
            return ids
        x, native = self._run_dtype(x, cast)
        if x.ndim != 3 or (self.input_size is not None and x.shape[2] != self.input_size):
            raise ValueError(f"x: expected shape (batch, steps, {self.input_size or 'features'}), got {x.shape}")
        return np.ascontiguousarray(x, dtype=native)

    def _check_feeds(self, given: list, cast: bool) -> tuple[list, np.dtype]:
        """Graph inputs (None where an optional one is left out) checked against the graph's ValueInfos.

        Every check depends on the inputs' shapes and dtypes only: C-contiguous arrays whose shapes and dtypes
        passed once, unchanged by the checks, pass again without them (a streamed chunk's feeds)."""
        sig = [None if x is None else (x.shape, x.dtype) if type(x) is np.ndarray and x.flags.c_contiguous
               else False for x in given]
        cacheable = False not in sig  # (cast is kept out of sig: its own False would match)
        key = tuple(sig) + (cast,)
        known = self._checked_feeds.get(key) if cacheable else None
        if known is not None:
            return list(given), known
        out, dtype = self._check_feeds_once(given, cast)
        if cacheable and all(a is b for a, b in zip(out, given)):
            if len(self._checked_feeds) >= 64:
                self._checked_feeds.clear()
            self._checked_feeds[key] = dtype
        return out, dtype

    def _check_feeds_once(self, given: list, cast: bool) -> tuple[list, np.dtype]:
        dtype = None
        sizes: dict[str, int] = {}
        out = []
        for info, x in zip(self.graph.inputs, given):
            if x is None:
                if not info.optional:
                    raise ValueError(f"input {info.name!r} is required")
                out.append(None)
                continue
            if info.dtype == "float":
                x, native = self._run_dtype(x, cast, info.name)
                if dtype is not None and native != dtype:
                    raise TypeError(f"{info.name}: dtype {x.dtype}, but the other inputs are {dtype}")
                dtype = native
                x = np.ascontiguousarray(x, dtype=native)
            else:
                x = np.asarray(x)
                want = info.dtype
                if (want == "bool" and x.dtype != np.bool_) or (want != "bool" and x.dtype.kind not in "iu"):
                    raise TypeError(f"{info.name}: expected {want}, got dtype {x.dtype}")
            if info.shape is not None and (x.ndim != len(info.shape) or any(
                    isinstance(d, int) and d != s for d, s in zip(info.shape, x.shape))):
                want = tuple(d if d is not None else "?" for d in info.shape)
                raise ValueError(f"{info.name}: expected shape {want}, got {x.shape}")
            if info.time_axis is not None and x.shape[info.time_axis] == 0:
                raise ValueError(f"{info.name}: expected at least one step, got shape {x.shape}")
            self._check_named_dims(info, x.shape, sizes)
            out.append(x)
        return out, dtype or self.dtype

    def _check_named_dims(self, info: Any, shape: tuple, sizes: dict) -> None:
        """An axis named in the graph's inputs has one size in every input, within metadata["dim_ranges"]
        (the sizes the source's forward was traced for, e.g. a torch slice ``x[:, :10]``)."""
        ranges = self.graph.metadata.get("dim_ranges", {})
        for name, size in zip(info.shape, shape):
            if not isinstance(name, str):
                continue
            if sizes.setdefault(name, size) != size:
                raise ValueError(f"{info.name}: axis {name!r} has size {size}, another input's has {sizes[name]}")
            lo, hi = ranges.get(name, (0, None))
            if size < lo or (hi is not None and size > hi):
                raise ValueError(f"{info.name}: axis {name!r} has size {size}; this model's source computes "
                                 f"sizes {lo}..{'' if hi is None else hi} only (its forward depends on the size)")

    def _initial(self, initial_state: Any, B: int | None, dtype: np.dtype, cast: bool) -> list:
        """Copies of a given initial state in dtype (the kernels update them in place); None where not given."""
        n = len(self.recurrent_layers)
        if initial_state is None:
            return [None] * n

        def check_dtype(arr: np.ndarray, where: str) -> None:
            if arr.dtype.newbyteorder("=") != dtype and not (cast and arr.dtype.kind in "fiu"):
                raise TypeError(f"{where}: dtype {arr.dtype}, expected {dtype} like x")

        given = check_state(initial_state, self.recurrent_layers, B, "initial_state", check_dtype, allow_missing=True)
        return [None if entry is None else tuple(np.array(arr, dtype=dtype, order="C") for arr in entry)
                for entry in given]

    # -- running ------------------------------------------------------------------------------
    def forward(self, x: Any, lengths: Any = None, initial_state: Any = None, *,
                cast: bool = False, record: bool = False) -> tuple:
        """Run the whole model over x; see the class docstring for shapes.

        ``lengths`` (B,) (chains) gives packed-sequence semantics: row b runs on its first lengths[b]
        steps, its outputs after them are 0 and its final state is taken at its last valid step.
        ``cast=True`` converts an input of another dtype to ``self.dtype`` instead of raising TypeError.
        ``record=True`` returns ``(y, state, gates)``: gates has one dict per recurrent layer,
        name -> (D, B, T, width) activations (i, f, g, o, c, h for LSTM; r, z, n, h for GRU; h for RNN),
        from a step-by-step NumPy run of the same equations (slow; see lstm_engine.gates).
        """
        inputs, dtype, B = self._inputs(x, lengths, cast)
        call = Call(self._initial(initial_state, B, dtype, cast), record=[] if record else None)
        outputs = self._execute(inputs, dtype, call)
        y = build_structure(self.graph.output_structure, outputs)
        if record:
            return y, call.states, [{name: v.astype(dtype) for name, v in trace.gates.items()}
                                    for _, trace in call.record]
        return y, call.states

    __call__ = forward

    def _inputs(self, x: Any, lengths: Any, cast: bool) -> tuple[list, np.dtype, int | None]:
        """The graph's inputs from forward's arguments, the run's dtype and the batch size (chains)."""
        if self.is_chain:
            x = self._check_chain_x(x, cast)
            B, T = x.shape[:2]
            if T == 0:
                raise ValueError(f"x: expected at least one step, got shape {x.shape}")
            if lengths is not None:
                lengths = check_lengths(lengths, B, T)
            return [x, lengths], self.dtype if self.takes_ids else x.dtype, B
        if lengths is not None:
            raise ValueError("lengths: this model is a graph without a lengths input; pass every graph input "
                             "in x (a tuple) or use model.run(feeds)")
        fed = [v for v in self.graph.inputs if not v.optional]
        given = list(x) if isinstance(x, tuple) and len(fed) != 1 else [x]
        if len(given) != len(fed):
            raise ValueError(f"x: this model takes {len(fed)} inputs ({', '.join(v.name for v in fed)}), got {len(given)}")
        it = iter(given)
        inputs, dtype = self._check_feeds([None if v.optional else next(it) for v in self.graph.inputs], cast)
        return inputs, dtype, None

    def _execute(self, inputs: list, dtype: np.dtype, call: Call) -> list:
        plan = self.plan(dtype)
        if call.record is not None:
            from ._base import one_blas_thread

            with one_blas_thread():
                return plan.run(inputs, call)
        # The recurrent kernels hold BLAS to self.threads themselves; the glue ops run in NumPy's BLAS.
        blas = _kernels.blas_threads()
        limit = blas > self._threads
        if limit:
            _kernels.set_blas_threads(self._threads)
        try:
            return plan.run(inputs, call)
        finally:
            if limit:
                _kernels.set_blas_threads(blas)

    def run(self, feeds: dict, *, cast: bool = False) -> dict:
        """Run the graph by name, as onnxruntime's InferenceSession.run: {input name: array} -> {output name: array}.

        Every input not marked optional must be given; outputs come back by the graph's output names.
        """
        if not isinstance(feeds, dict):
            raise TypeError(f"feeds: expected a dict of input name -> array, got {type(feeds).__name__}")
        names = self._input_names
        if not feeds.keys() <= names.keys():  # (a streamed chunk's run: its feeds are checked in a few steps)
            unknown = sorted(set(feeds) - set(names))
            raise ValueError(f"feeds: {unknown[0]!r} is not an input of this model; its inputs are {sorted(names)}")
        inputs, dtype = self._check_feeds([feeds.get(name) for name in names], cast)
        if self.is_chain:
            x, lengths = inputs
            if x.ndim != (2 if self.takes_ids else 3):
                raise ValueError(f"x: expected shape {self.graph.inputs[0].shape}, got {x.shape}")
            if self.takes_ids:
                self.layers[0].check_ids(x)
            if lengths is not None:
                check_lengths(lengths, x.shape[0], x.shape[1])
        outputs = self._execute(inputs, dtype, Call([None] * len(self.recurrent_layers)))
        return dict(zip(self.graph.outputs, outputs))

    def __reduce__(self) -> tuple:
        # A pickled Model is the engine's own file bytes, read back by the same checked loader as
        # le.load: it travels to Dask and Ray workers as weights, never as code. Threads are not
        # kept: the receiving worker sizes them to its own cores.
        from .formats.native import from_bytes, to_bytes

        return from_bytes, (to_bytes(self),)

    # -- streaming ----------------------------------------------------------------------------
    def session(self, batch_size: int = 1, *, dtype: Any = None) -> "Session":
        """A stateful Session for streaming ``batch_size`` sequences step by step (see lstm_engine.session)."""
        from .session import Session

        return Session(self, batch_size, dtype=dtype)

    def pool(self, max_batch: int = 64, *, max_delay: float = 0.001, dtype: Any = None) -> "StreamPool":
        """A StreamPool: many independent streams whose concurrent steps run as one batch (see lstm_engine.pool)."""
        from .pool import StreamPool

        return StreamPool(self, max_batch, max_delay=max_delay, dtype=dtype)
