"""The ``lstm-engine`` command. Each subcommand is one ``add_<name>(subparsers)`` function below.

    lstm-engine generate "Once upon a"          # stream text from the shipped character model
    lstm-engine inspect model.safetensors       # layers, sizes, parameters, where it came from
    lstm-engine run model.pt x.npy -o y.npy     # batched inference over a file of sequences
    lstm-engine verify model.safetensors --source model.pt   # against the framework it came from
    lstm-engine verify model.onnx                            # an ONNX model against onnxruntime
    lstm-engine bench model.safetensors         # step latency and throughput here
    lstm-engine gates model.safetensors x.npy -o gates.png   # the gates at work, memory, gradient flow
    lstm-engine serve model.safetensors --state-dir states    # streams over HTTP and WebSocket

A user mistake (a bad argument, a missing or broken file, an input the engine refuses) is one line on
stderr and exit status 1 (2 for usage errors). Anything else is a bug and keeps its traceback; ``--debug``
(or LSTM_ENGINE_DEBUG=1 in the environment) shows the traceback of user mistakes too.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UserError

PROG = "lstm-engine"
SHIPPED_MODEL = "builtin:charlm"  # lstm_engine/data/charlm.safetensors, see formats.BUILTIN_MODELS


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")




# -- generate ------------------------------------------------------------------------------------

def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate", help="stream text from a character-level language model",
        description="Continue PROMPT with a character-level language model, printing each character as it "
                    "is produced. Without --model, the model shipped with lstm_engine (trained on "
                    "Shakespeare's plays) is used.",
        epilog=f'example: {PROG} generate "ROMEO:" --max-new-tokens 400 --temperature 0.7 --seed 1',
    )
    p.add_argument("prompt", help="the text to continue")
    p.add_argument("--max-new-tokens", "-n", type=int, default=300, metavar="N",
                   help="characters to generate (default 300)")
    p.add_argument("--temperature", "-t", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 = always the likeliest character (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K likeliest only")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample among the likeliest characters whose probabilities sum to P")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="random seed, for reproducible text")
    p.add_argument("--model", default=None, metavar="PATH",
                   help=f"a model saved with lstm_engine.save whose metadata has 'vocab' (default {SHIPPED_MODEL})")
    p.set_defaults(func=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    from .generate import check_sampling

    # Argument errors first, before the model is read; named as the options are.
    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as exc:
        # "expected None or ..." is the Python API's wording; an option that is given is never None.
        name, _, rest = str(exc).partition(":")
        raise UserError(f"--{name.replace('_', '-')}:{rest.replace('expected None or ', 'expected ')}") from None
    model = _load_model(args.model or SHIPPED_MODEL)
    vocab = model.metadata.get("vocab")
    if not isinstance(vocab, str) or not model.takes_ids:
        raise UserError(f"{args.model or SHIPPED_MODEL}: not a character-level language model "
                        "(expected token ids in and metadata['vocab'] = the characters)")
    if not args.prompt:
        raise UserError("PROMPT: expected at least one character")
    index = {ch: i for i, ch in enumerate(vocab)}
    unknown = sorted({ch for ch in args.prompt if ch not in index})
    if unknown:
        raise UserError(f"PROMPT: the model does not know the character(s) {''.join(unknown)!r}; "
                        f"it knows {vocab!r}")
    session = model.session()
    tokens = session.generate([index[ch] for ch in args.prompt], args.max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    for tok in tokens:
        out.write(vocab[tok])
        out.flush()
    out.write("\n")
    out.flush()
    return 0


# -- shared by the model commands -----------------------------------------------------------------

def _load_model(path: str, threads: int | None = None):
    """A model file or a built-in model's name (builtin:charlm), loaded."""
    from . import load
    from .formats import resolve

    path = resolve(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    model = load(path)
    if threads is not None:
        model.threads = _positive(threads, "--threads")
    return model


def _positive(value: int, name: str) -> int:
    if value < 1:
        raise UserError(f"{name}: expected at least 1, got {value}")
    return value


def _load_array(path: str, what: str, mmap: bool = False):
    import numpy as np

    if not os.path.exists(path):
        raise UserError(f"{path}: no such file")
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        # NumPy's own message for a non-.npy file talks of pickles, which would be the wrong advice.
        raise UserError(f"{path}: not a .npy array for {what} (expected a file written by numpy.save)") from None
    if not isinstance(array, np.ndarray):  # an .npz archive
        raise UserError(f"{path}: an .npz archive, not a .npy array for {what} (save one array with numpy.save)")
    return array


def _check_input(model, x, path: str, given: tuple | None = None):
    """x's shape against the model's: (B, T) ids or (B, T, features), as one line naming the file.
    ``given``: the shape as the file holds it, when the command added the batch axis to one sequence."""
    given = x.shape if given is None else given
    if not model.is_chain:
        fed = [v for v in model.graph.inputs if not v.optional]
        if len(fed) != 1 or fed[0].shape[:1] != ["batch"]:
            raise UserError(f"{path}: this command feeds one array with the batch first; the model's inputs are "
                            f"{', '.join(f'{v.name} {tuple(v.shape)}' for v in fed)}")
        want = fed[0].shape
        if x.ndim != len(want) or any(isinstance(d, int) and d != n for d, n in zip(want, x.shape)):
            raise UserError(f"{path}: expected shape {tuple(want)}, got {given}")
        if x.size == 0:
            raise UserError(f"{path}: expected at least one sequence of at least one step, got shape {given}")
        return
    if model.takes_ids:
        if x.ndim != 2 or x.dtype.kind not in "iu":
            raise UserError(f"{path}: expected token ids, integers of shape (batch, steps), "
                            f"got {x.dtype} {given}")
    elif x.ndim != 3 or (model.input_size is not None and x.shape[2] != model.input_size):
        raise UserError(f"{path}: expected shape (batch, steps, {model.input_size or 'features'}), got {given}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise UserError(f"{path}: expected at least one sequence of at least one step, got shape {given}")


def _random_input(model, B: int, T: int, rng, shapes: list | None = None):
    """Random valid input: a chain's x, or a graph's inputs (a tuple for several) in their declared shapes.

    A graph's other named axes take the size its source's example input had (metadata "example_shapes"),
    every named axis kept within the sizes the source allows ("dim_ranges"); ``shapes`` (one per input)
    overrides them all.
    """
    from .graph import id_range

    if model.is_chain:
        if model.takes_ids:
            return rng.integers(0, model.layers[0].num_embeddings, (B, T))
        return rng.standard_normal((B, T, model.input_size or 1)).astype(model.dtype)
    sizes = {"batch": B, "steps": T}
    examples = model.graph.metadata.get("example_shapes", {})
    ranges = model.graph.metadata.get("dim_ranges", {})
    out = []
    for k, info in enumerate(v for v in model.graph.inputs if not v.optional):
        shape = []
        for axis, d in enumerate(info.shape):
            if not isinstance(d, str):
                shape.append(d if isinstance(d, int) else 1)
                continue
            lo, hi = ranges.get(d, (1, None))
            size = sizes.get(d, examples.get(info.name, [1] * len(info.shape))[axis])
            shape.append(max(lo, size if hi is None else min(size, hi)))
        shape = shape if shapes is None else shapes[k]
        if info.dtype == "float":
            out.append(rng.standard_normal(shape).astype(model.dtype))
        elif info.dtype == "bool":
            out.append(rng.random(shape) < 0.5)
        else:
            vocab = id_range(model.graph, info.name)
            if vocab is None:
                raise UserError(f"cannot make random values for integer input {info.name!r}: it is not only "
                                "a lookup into a table")
            out.append(rng.integers(0, vocab, shape))
    return out[0] if len(out) == 1 else tuple(out)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


# -- inspect -------------------------------------------------------------------------------------

def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect", help="show a model's layers, sizes, parameters and where it came from",
        description="Print the architecture of a model file (any format lstm_engine loads) as a table: "
                    "each layer's type, sizes, directions, projection, parameter count, dtype and the "
                    "memory its weights take, then the totals, the file format and the framework it came from.",
        epilog=f"example: {PROG} inspect model.safetensors",
    )
    p.add_argument("model", metavar="MODEL", help="a model file: .safetensors, .pt/.pth/.bin, .keras or .h5")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    from .formats import describe, resolve

    model = _load_model(args.model)
    if model.is_chain:
        _inspect_chain(model)
    else:
        _inspect_graph(model)
    print(f"file: {describe(resolve(args.model))}")
    meta = model.metadata
    source = meta.get("source", "unknown")
    version = meta.get("framework_version") or meta.get("keras_version")
    line = f"source: {source}"
    if version:
        line += f" {version}" if source in ("torch", "keras") else f" (version {version})"
    for key in ("source_format", "backend"):
        if meta.get(key):
            line += f", {key.replace('_', ' ')} {meta[key]}"
    print(line)
    for key, value in meta.items():
        if key in ("source", "framework_version", "keras_version", "source_format", "backend"):
            continue
        text = f"{len(value)} entries" if isinstance(value, (str, list, dict)) and len(value) > 60 else repr(value)
        print(f"{key}: {text}")
    return 0


def _print_table(rows: list[tuple], left: set[int]) -> None:
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    for r in rows:
        print("  ".join(cell.ljust(w) if c in left else cell.rjust(w) for c, (cell, w) in enumerate(zip(r, widths))))


def _layer_row(layer) -> tuple[str, str, str, str, int, int]:
    """A layer's name (with its options), hidden size, projection, directions, parameters and weight bytes."""
    import numpy as np

    params = sum(int(np.prod(w.shape)) for w in layer.weights().values())
    nbytes = params * sum(dt.itemsize for dt in layer.dtypes)
    q = layer.quantization
    if q is not None:  # the stored weights (and int8 scales), and the float32 rest
        nbytes = q.nbytes + (params - sum(a.size for a in q.stored.values())) * 4
    name = type(layer).__name__
    hidden = proj = dirs = "-"
    if layer.is_recurrent:
        hidden, proj, dirs = str(layer.hidden_size), str(layer.proj_size or "-"), str(layer.num_directions)
        extra = [k for k in ("go_backwards",) if getattr(layer, k)]
        if layer.activation != "tanh" or (name != "RNN" and layer.recurrent_activation != "sigmoid"):
            extra.append(layer.activation if name == "RNN" else
                         f"{layer.activation}/{layer.recurrent_activation}")
        if name == "GRU" and not layer.reset_after:
            extra.append("reset_before")
        if not layer.return_sequences:
            extra.append("last step")
        if layer.bidirectional and layer.merge_mode != "concat":
            extra.append(layer.merge_mode)
        name += f" ({', '.join(extra)})" if extra else ""
    elif name == "Embedding":
        hidden = f"vocab {layer.num_embeddings}"
        name += " (mask_zero)" if layer.mask_zero else ""
    elif getattr(layer, "activation", "linear") not in ("linear", None):
        name += f" ({layer.activation})"
    return name, hidden, proj, dirs, params, nbytes


def _dtype_text(layer) -> str:
    """The float dtypes a layer runs, or how its weights are stored when quantized."""
    q = layer.quantization
    if q is None:
        return "/".join(str(dt) for dt in layer.dtypes)
    return q.format + ("" if q.format != "int8" else " per-channel" if q.per_channel else " per-tensor")


def _inspect_chain(model) -> None:
    rows = [("#", "layer", "in", "out", "hidden", "proj", "dirs", "params", "dtype", "weights")]
    total_params = total_bytes = 0
    for i, layer in enumerate(model.layers):
        name, hidden, proj, dirs, params, nbytes = _layer_row(layer)
        total_params += params
        total_bytes += nbytes
        size = lambda v: "-" if v is None else str(v)  # noqa: E731
        rows.append((str(i), name, "ids" if getattr(layer, "accepts_ids", False) else size(layer.input_size),
                     size(layer.output_size), hidden, proj, dirs, f"{params:,}",
                     _dtype_text(layer), _bytes(nbytes) if params else "-"))
    _print_table(rows, {1, 8})
    print(f"total: {len(model.layers)} layers ({len(model.recurrent_layers)} recurrent), "
          f"{total_params:,} parameters, {_bytes(total_bytes)} of weights")
    print(f"input: {'token ids (batch, steps)' if model.takes_ids else f'(batch, steps, {model.input_size})'}"
          f"   output: (batch, {'steps, ' if _returns_sequences(model) else ''}{model.output_size})")


def _attrs_text(node) -> str:
    from .graph import Graph

    parts = []
    for k, v in node.attrs.items():
        if isinstance(v, Graph):
            parts.append(f"{k}: {len(v.nodes)} nodes")
        else:
            text = repr(v)
            parts.append(f"{k}={text if len(text) <= 24 else text[:21] + '...'}")
    return ", ".join(parts)


def _inspect_graph(model) -> None:
    """The graph's nodes in the order they run, each with its op, values and (for layers) sizes."""
    import numpy as np

    graph = model.graph
    rows = [("#", "node", "op", "inputs -> outputs", "details", "params")]
    total_params = total_bytes = 0
    for i, node in enumerate(graph.nodes):
        flow = f"{', '.join(n or '-' for n in node.inputs)} -> {', '.join(n or '-' for n in node.outputs)}"
        details, params = _attrs_text(node), 0
        if node.op in ("Recurrent", "Layer"):
            layer = graph.layers[node.attrs["layer"]]
            name, hidden, proj, dirs, params, nbytes = _layer_row(layer)
            details = name if not layer.is_recurrent else (
                f"{name}: in {layer.input_size}, hidden {hidden}" + (f", proj {proj}" if proj != "-" else "")
                + (", bidirectional" if layer.bidirectional else ""))
            total_params += params
            total_bytes += nbytes
        rows.append((str(i), node.name if len(node.name) <= 28 else node.name[:25] + "...", node.op,
                     flow if len(flow) <= 48 else flow[:45] + "...", details, f"{params:,}" if params else "-"))
    _print_table(rows, {1, 2, 3, 4})
    consts = sum(int(np.prod(v.shape)) for v in graph.constants.values())
    total_bytes += sum(v.nbytes for v in graph.constants.values())
    print(f"total: {len(graph.nodes)} nodes ({len(model.recurrent_layers)} recurrent), "
          f"{total_params + consts:,} parameters ({consts:,} in constants), {_bytes(total_bytes)} of weights, "
          f"{'/'.join(str(dt) for dt in model.dtypes)}")
    shown = lambda v: f"{v.name} {v.dtype} ({', '.join(str(d) for d in v.shape)})" + (  # noqa: E731
        " optional" if v.optional else "")
    print(f"inputs: {'; '.join(shown(v) for v in graph.inputs)}   outputs: {', '.join(graph.outputs)}")


def _returns_sequences(model) -> bool:
    return all(layer.return_sequences for layer in model.recurrent_layers)


# -- run -----------------------------------------------------------------------------------------

# Rows per chunk are chosen so one chunk's activations stay near this (unless --batch-size says otherwise).
CHUNK_BYTES = 64 << 20


def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run a model over a .npy file of sequences",
        description="Run MODEL over every sequence in INPUT.npy — (batch, steps, features) floats, or "
                    "(batch, steps) token ids for a model that starts with an Embedding — in chunks of "
                    "--batch-size sequences so memory stays bounded, and write the outputs to OUT.npy. "
                    "A progress bar shows on jobs of several chunks (tqdm's if installed).",
        epilog=f"example: {PROG} run model.safetensors x.npy --lengths lengths.npy -o y.npy --state-out state.npz",
    )
    p.add_argument("model", metavar="MODEL", help="a model file")
    p.add_argument("input", metavar="INPUT.npy", help="the input sequences")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npy", help="where to write the outputs")
    p.add_argument("--lengths", metavar="L.npy", help="(batch,) integer lengths: packed-sequence semantics")
    p.add_argument("--batch-size", type=int, default=None, metavar="N",
                   help=f"sequences per chunk (default: as many as fit in {CHUNK_BYTES >> 20} MiB of activations)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="threads to use (default: every core)")
    p.add_argument("--state-out", metavar="S.npz",
                   help="also save the final states: layer<k>_h (and layer<k>_c for LSTM), "
                        "each (directions, batch, width)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--dask", metavar="SCHEDULER",
                         help="score the chunks on a Dask cluster: a scheduler address (tcp://host:8786), or "
                              "local:N for N worker processes on this machine (needs the dask extra: pip install '.[dask]' "
                              "from a checkout); "
                              "--threads is then per task")
    cluster.add_argument("--ray", metavar="ADDRESS",
                         help="score the chunks on a Ray cluster: auto (the running one), an address, or local:N "
                              "for N CPUs on this machine (needs the ray extra: pip install '.[ray]' from a checkout); "
                              "--threads is then per actor")
    p.set_defaults(func=run_run)


class _Progress:
    """tqdm's bar when it is installed, else one self-overwriting line on stderr."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="seq", file=sys.stderr)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled:
            print(f"\r{self.done}/{self.total} sequences ({100 * self.done // self.total}%)", end="",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)


def run_run(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    model = _load_model(args.model, args.threads)
    x = _load_array(args.input, "the input", mmap=True)
    _check_input(model, x, args.input)
    B, T = x.shape[:2]
    lengths = None
    if args.lengths and not model.is_chain:
        raise UserError("--lengths: this model is a graph without a lengths input")
    if args.lengths:
        lengths = _load_array(args.lengths, "--lengths")
        if lengths.shape != (B,) or lengths.dtype.kind not in "iu":
            raise UserError(f"--lengths {args.lengths}: expected ({B},) integers, one per sequence of the input, "
                            f"got {lengths.dtype} {lengths.shape}")
    if args.batch_size is None:
        widest = max([model.input_size or 0, model.output_size or 0, int(np.prod(x.shape[2:]))]
                     + [4 * layer.hidden_size * layer.num_directions for layer in model.recurrent_layers])
        rows = max(1, CHUNK_BYTES // (T * widest * model.dtype.itemsize * 3))
    else:
        rows = _positive(args.batch_size, "--batch-size")
    chunks = range(0, B, rows)
    progress = _Progress(B, enabled=len(chunks) > 1 and not args.quiet)
    out = None
    states: dict = {}
    start = time.perf_counter()
    try:
        for lo, y, state in _score_chunks(args, model, x, lengths, chunks, rows):
            if not isinstance(y, np.ndarray):
                raise UserError(f"{args.model}: the model returns several outputs; run writes one array "
                                "(use model.run in Python)")
            hi = lo + len(y)
            if out is None:
                # Written chunk by chunk into the file, so the whole output never sits in memory.
                out = np.lib.format.open_memmap(args.output, mode="w+", dtype=y.dtype, shape=(B,) + y.shape[1:])
            out[lo:hi] = y
            if args.state_out:
                states[lo] = state
            progress.update(hi - lo)
    finally:
        progress.close()
    out.flush()
    shape = out.shape
    del out
    elapsed = time.perf_counter() - start
    print(f"wrote {args.output}: {shape} {model.dtype} from {B} sequences of {T} steps "
          f"in {len(chunks)} chunk(s) of {rows}{_where(args)}, {elapsed:.3f} s ({B * T / elapsed:,.0f} steps/s)")
    if args.state_out:
        arrays = {}
        for k, layer in enumerate(model.recurrent_layers):
            for j, name in enumerate(("h", "c")[: len(layer.state_shapes)]):
                arrays[f"layer{k}_{name}"] = np.concatenate([states[lo][k][j] for lo in sorted(states)], axis=1)
        np.savez(args.state_out, **arrays)
        print(f"wrote {args.state_out}: {', '.join(f'{k} {v.shape}' for k, v in arrays.items())}")
    return 0


def _score_chunks(args: argparse.Namespace, model, x, lengths, chunks: range, rows: int):
    """(lo, y, state) for every chunk: here in order, or on a Dask or Ray cluster as the chunks finish."""
    import numpy as np

    def batches():
        for lo in chunks:
            xb = np.ascontiguousarray(x[lo:lo + rows])
            if not model.takes_ids:
                xb = xb.astype(model.dtype, copy=False)
            yield lo, xb, None if lengths is None else lengths[lo:lo + rows]

    if args.dask or args.ray:
        engine = "dask" if args.dask else "ray"
        try:
            cluster = importlib.import_module(f"lstm_engine.{engine}")
        except ImportError as exc:
            raise UserError(f"--{engine} needs {engine.capitalize()}: pip install \".[{engine}]\" from a checkout "
                            f"({exc})") from None
        yield from cluster.score_chunks(args.dask or args.ray, model, batches(), args.threads)
        return
    for lo, xb, lb in batches():
        y, state = model.forward(xb, lb)
        yield lo, y, state


def _where(args: argparse.Namespace) -> str:
    return f" on Dask {args.dask}" if args.dask else f" on Ray {args.ray}" if args.ray else ""


# -- verify --------------------------------------------------------------------------------------

def add_verify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "verify", help="check a model against the framework it came from",
        description="Run random inputs (and, for PyTorch state_dicts, random lengths) through MODEL and "
                    "through the ORIGINAL it was exported from — a PyTorch state_dict (.pt/.pth/.bin/"
                    ".safetensors) with torch installed, or a Keras model (.keras/.h5) with keras installed — "
                    "and print the max abs/rel error of every output and state. An ONNX file (MODEL itself, or "
                    "--source) is run by onnxruntime on the same inputs, compared output by output. "
                    "A graph model (read from a "
                    "module's forward or an ONNX file) is compared with that module or file only, never with "
                    "a model rebuilt from weights. Without --source, or when the source cannot be run here, "
                    "verify checks lstm_engine against itself (save/load round trip, kernels against a "
                    "step-by-step NumPy run) and says NOT CHECKED. Exit status: 0 ok, 1 an error passes "
                    f"--atol, {NOT_CHECKED} not checked against the source.",
        epilog=f"example: {PROG} verify model.safetensors --source model.pt --atol 1e-5",
    )
    p.add_argument("model", metavar="MODEL", help="the model file lstm_engine runs")
    p.add_argument("--source", metavar="ORIGINAL", help="the file it was exported from (a torch module: a .py "
                   "script defining `model`, or a .pt2 saved with torch.export.save)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest absolute error allowed (default 1e-4)")
    p.add_argument("--batch", type=int, default=4, metavar="B", help="random sequences (default 4)")
    p.add_argument("--steps", type=int, default=12, metavar="T", help="steps per sequence (default 12)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--fill", action="append", default=[], metavar="NAME=NUMBER",
                   help="ONNX: fill input NAME with NUMBER instead of random values (e.g. sr=16000); repeatable")
    p.set_defaults(func=run_verify)


def _errors(name: str, got, want) -> tuple[str, float]:
    import numpy as np

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise UserError(f"{name}: lstm_engine gives shape {got.shape}, the reference {want.shape}; "
                        "the files do not describe the same model")
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    rel = err / scale if scale > 0 else err
    return f"  {name:<14} max abs {err:9.2e}   max rel {rel:9.2e}", err


def _keras_reference(path: str, x):
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    try:
        net = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many kinds for a file it cannot read
        raise UserError(f"{path}: keras cannot load it: {str(exc).splitlines()[0]}") from None
    out = net(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    return keras.ops.convert_to_numpy(out)


@dataclass
class Reference:
    """What a model's original computes, for verify to compare with.

    outputs: one array per graph output, in ``model.graph.outputs`` order (for a chain: [y]), or a dict
    by output name; states: per recurrent layer (h, c) / (h,) as ``model.forward`` returns them, or None
    where the source does not give them; inputs: what the model is run on, forward's x, or a dict by
    input name for ``model.run`` (None: the random x verify made); lengths: the lengths the source ran
    with, or None; note: a line printed under the header (what was compared, and what was not).
    """

    label: str
    outputs: list | dict
    states: list | None = None
    inputs: Any = None
    lengths: Any = None
    note: str = ""


class NotChecked(Exception):
    """The model's source cannot be run here: verify says why instead of "ok"."""


@dataclass
class Source:
    """A kind of file verify can take the truth from.

    detect(path) -> bool; reference(model, path, x, rng, args) -> Reference, raising NotChecked when the
    source cannot run here (its framework missing, a file without the model's forward) and UserError for
    a broken file. model_is_source: MODEL itself, given without --source, is such a file (an ONNX file).
    """

    kind: str
    detect: Callable[[str], bool]
    reference: Callable[..., Reference]
    model_is_source: bool = False
    makes_inputs: bool = False  # reference() makes the inputs itself (x is None): verify makes none


# Where verify finds the truth: the first Source whose detect accepts the file runs. Loaders of other
# formats put theirs in front with register_source.
SOURCES: list[Source] = []

# Exit status of a verify that could not compare the model with its source (nothing was checked).
NOT_CHECKED = 2


def register_source(source: Source) -> None:
    """Let verify compare models with sources of another kind (checked before the kinds already known)."""
    SOURCES.insert(0, source)


def _detects(*kinds: str) -> Callable[[str], bool]:
    """A Source.detect accepting files that formats.detect says are one of ``kinds``."""
    def detect(path: str) -> bool:
        from .formats import detect

        return detect(path) in kinds
    return detect


def _keras_source(model, path: str, x, rng, args) -> Reference:
    # Keras 3 picks its backend at import, and without TensorFlow the default one fails to import.
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as exc:
        raise NotChecked(f"--source is a Keras model but keras cannot be imported ({exc}); install keras "
                         "and a backend (torch: KERAS_BACKEND=torch)") from None
    if not model.is_chain:
        raise NotChecked("a graph model is not compared with a Keras file (the Keras loader builds chains)")
    return Reference(f"keras {keras.__version__}", [_keras_reference(path, x)],
                     note="(Keras models keep their states inside; the output is compared)")


def _torch_state_dict_source(model, path: str, x, rng, args) -> Reference:
    if not model.is_chain:
        raise NotChecked(f"{path} is a state_dict: it holds weights, not the forward that a graph model runs; "
                         "verify a graph model against its module or exported program")
    if not all(layer.is_recurrent for layer in model.layers):
        raise NotChecked(f"{path} is a state_dict: it holds a network's weights, not its forward, so only a bare "
                         "nn.LSTM/GRU/RNN can be rebuilt from it; verify a model with other layers against its "
                         "module (--source a .py script defining `model`, or a torch.export .pt2 file)")
    try:
        import torch
    except ImportError:
        raise NotChecked("--source is a PyTorch state_dict but torch is not installed") from None
    B, T = x.shape[:2]
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    from ._torch_reference import torch_reference

    y, states = torch_reference(model, path, x, lengths)
    return Reference(f"torch {torch.__version__}", [y], states, lengths=lengths)


def _is_onnx(path: str) -> bool:
    return path.lower().endswith(".onnx") or _detects("onnx")(path)


def _onnx_source(model, path: str, x, rng, args) -> Reference:
    """onnxruntime running the ONNX file on random floats (integers 0, --fill as given), by input name."""
    import numpy as np

    try:
        import onnxruntime
    except ImportError:
        raise NotChecked(f"{path} is an ONNX model and onnxruntime, the reference, is not installed "
                         "(pip install onnxruntime)") from None
    try:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # its failures come back as exceptions, reported as NOT CHECKED
        sess = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own kinds
        raise NotChecked(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0][:300]}") from None
    inputs = sess.get_inputs()
    fills = {}
    for item in args.fill:
        name, _, number = item.partition("=")
        try:
            fills[name] = float(number)
        except ValueError:
            raise UserError(f"--fill {item!r}: expected NAME=NUMBER") from None
        if name not in {i.name for i in inputs}:
            raise UserError(f"--fill {name}: {path} has no such input; its inputs: {[i.name for i in inputs]}")
    feeds = {}
    for info in inputs:
        sizes = iter([args.batch] + [args.steps] * 8)  # open sizes: the first is the batch, the others steps
        shape = [d if isinstance(d, int) else next(sizes) for d in info.shape]
        dtype = (np.float64 if "double" in info.type else np.float32 if "float" in info.type else
                 np.bool_ if "bool" in info.type else np.int32 if "int32" in info.type else np.int64)
        if info.name in fills:
            feeds[info.name] = np.full(shape, fills[info.name], dtype)
        elif dtype in (np.float32, np.float64):
            feeds[info.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[info.name] = np.zeros(shape, dtype)
    shown = ", ".join(f"{k} {tuple(v.shape)}" for k, v in feeds.items())
    try:
        want = sess.run(None, feeds)
    except Exception as exc:  # onnxruntime raises its own kinds
        raise NotChecked(f"onnxruntime cannot run {path} on inputs {shown}: {str(exc).splitlines()[0][:300]} "
                         "(set sizes with --batch/--steps, values with --fill)") from None
    return Reference(f"onnxruntime {onnxruntime.__version__}", {o.name: w for o, w in zip(sess.get_outputs(), want)},
                     inputs=feeds, note=f"inputs {shown} (random floats, integers 0, --fill as given)")
def _engine_source(model, path: str, x, rng, args) -> Reference:
    """Another lstm_engine model, typically the float model MODEL was quantized from: outputs, states, mean error."""
    import numpy as np

    source = _load_model(path)
    B, T = x.shape[:2]
    lengths = rng.integers(1, T + 1, B)
    lengths[0] = T
    y, states = source.forward(x, lengths)
    mine = model.forward(x, lengths)[0]
    mean = float(np.mean(np.abs(np.asarray(mine, np.float64) - np.asarray(y, np.float64))))
    return Reference("lstm_engine", _flat_outputs(source, y), states, lengths=lengths,
                     note=f" (output mean abs error {mean:.2e})")


def _is_torch_module_source(path: str) -> bool:
    """A script that defines the module, or a program saved with torch.export.save."""
    return path.endswith(".py") or _detects("torch-export")(path)


def _torch_module_source(model, path: str, x, rng, args) -> Reference:
    """The module itself (a graph read from its forward is compared with nothing else): every tensor it returns."""
    import numpy as np

    try:
        import torch

        from .formats.torch_export import load_reference
    except ImportError:
        raise NotChecked("--source is a torch module but torch is not installed") from None
    from .errors import LoadError

    try:
        call, shapes = load_reference(path)
    except LoadError as exc:
        raise UserError(str(exc)) from None
    if shapes is not None:  # an exported program runs at the shapes it was exported for
        x = _random_input(model, 0, 0, rng, shapes)
    inputs = x if isinstance(x, tuple) else (x,)
    want = call(*(torch.from_numpy(np.asarray(a)) for a in inputs))
    leaves = torch.utils._pytree.tree_flatten(want)[0]
    shown = ", ".join(str(np.shape(a)) for a in inputs)
    return Reference(f"torch {torch.__version__}", [t.detach().numpy() for t in leaves], inputs=x,
                     note=f"(inputs {shown}; every tensor the module returns is compared)")


SOURCES += [Source("torch module (.py defining `model`, or a torch.export.save .pt2)", _is_torch_module_source,
                   _torch_module_source),
            Source("onnx", _is_onnx, _onnx_source, model_is_source=True, makes_inputs=True),
            Source("keras", _detects("keras", "hdf5"), _keras_source),
            Source("torch state_dict", _detects("safetensors", "torch"), _torch_state_dict_source),
            Source("lstm_engine", _detects("lstm_engine"), _engine_source)]


def _flat_outputs(model, y) -> list:
    """y (as forward returns it) as one array per graph output, in graph.outputs order."""
    if model.is_chain:
        return [y]
    flat: dict[int, object] = {}

    def walk(structure, value):
        if isinstance(structure, int):
            flat[structure] = value
        else:
            for s, v in zip(structure, value):
                walk(s, v)
    walk(model.graph.output_structure, y)
    return [flat[i] for i in range(len(model.graph.outputs))]


def _compare(model, outputs, state, ref_outputs, ref_state):
    """(name, got, want) of every output and, where the reference has them, every state."""
    names = ["output"] if model.is_chain else model.graph.outputs
    if isinstance(ref_outputs, dict):
        missing = sorted(set(ref_outputs) - set(names))
        if missing:
            raise UserError(f"the model has no output {missing[0]!r}; its outputs: {names}")
        yield from ((n, outputs[names.index(n)], w) for n, w in ref_outputs.items())
    else:
        if len(ref_outputs) != len(outputs):
            raise UserError(f"the reference gives {len(ref_outputs)} outputs, the model {len(outputs)}")
        yield from zip(names, outputs, ref_outputs)
    if ref_state is None:
        return
    if len(ref_state) != len(state):
        raise UserError(f"the reference has {len(ref_state)} recurrent layers, the model {len(state)}")
    # Numbered as inspect and gates number them: the layer's row in model.layers.
    numbers = [next((i for i, known in enumerate(model.layers) if known is layer), k)
               for k, layer in enumerate(model.recurrent_layers)]
    for k, (mine, theirs) in enumerate(zip(state, ref_state)):
        for name, got, want in zip("hc", mine, theirs):
            yield f"layer {numbers[k]} {name}", got, want


def _self_checks(model, x, lengths, lines: list, errs: list) -> None:
    """lstm_engine against itself: a save/load round trip, and the kernels against a step-by-step NumPy run."""
    import tempfile

    from . import load, save

    y, state = model.forward(x, lengths)
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "model.safetensors")
        save(model, copy)
        y2, state2 = load(copy).forward(x, lengths)
    checks = [("save/load round trip", (y2, state2))]
    quantized = sorted({layer.quantization.format for layer in model.layers if layer.quantization})
    if quantized:
        # The NumPy equations run float activations: their difference is the quantization's, not a bug.
        lines.append(f" ({'/'.join(quantized)} weights: compare with the float model by --source FLOAT)")
    else:
        y3, state3, _ = model.forward(x, lengths, record=True)
        checks.append(("kernels vs step-by-step NumPy", (y3, state3)))
    outputs = _flat_outputs(model, y)
    for title, (ry, rs) in checks:
        lines.append(f" {title}:")
        for name, got, want in _compare(model, outputs, state, _flat_outputs(model, ry), rs):
            line, err = _errors(name, got, want)
            lines.append(line)
            errs.append(err)


def run_verify(args: argparse.Namespace) -> int:
    import numpy as np

    model = _load_model(args.model)
    B, T = _positive(args.batch, "--batch"), _positive(args.steps, "--steps")
    rng = np.random.default_rng(args.seed)
    source = args.source
    if source is None:
        from .formats import resolve

        path = resolve(args.model)  # builtin:charlm is a file's name, not a file
        source = next((path for src in SOURCES if src.model_is_source and src.detect(path)), None)
    elif not os.path.exists(source):
        raise UserError(f"{source}: no such file")
    found = None if source is None else next((src for src in SOURCES if src.detect(source)), None)
    x = None if found is not None and found.makes_inputs else _random_input(model, B, T, rng)
    lines: list[str] = []
    errs: list[float] = []
    why = ""
    if source is None:
        lengths = None
        if model.is_chain:
            lengths = rng.integers(1, T + 1, B)
            lengths[0] = T
        _self_checks(model, x, lengths, lines, errs)
        header = (f"verify {args.model}: {B} random sequences of {T} steps"
                  + ("" if lengths is None else f", lengths {lengths.tolist()}") + f", {model.dtype}")
        why = "no --source given (the checks above are lstm_engine against itself)"
    else:
        if found is None:
            raise UserError(f"{source}: not a source verify knows ({', '.join(src.kind for src in SOURCES)})")
        try:
            ref = found.reference(model, source, x, rng, args)
        except NotChecked as exc:
            ref, why = None, str(exc)
        if ref is not None:
            if isinstance(ref.inputs, dict):
                got = model.run(ref.inputs, cast=True)
                outputs, state = [got[n] for n in model.graph.outputs], None
            else:
                y, state = model.forward(x if ref.inputs is None else ref.inputs, ref.lengths, cast=True)
                outputs = _flat_outputs(model, y)
            if ref.note:
                lines.append(f" {ref.note.strip()}")
            for name, got_, want in _compare(model, outputs, state, ref.outputs, ref.states):
                line, err = _errors(name, got_, want)
                lines.append(line)
                errs.append(err)
        header = (f"verify {args.model} against {source}" + (f" ({ref.label})" if ref else "")
                  + (f": {B} random sequences of {T} steps" if ref is None or ref.inputs is None else "")
                  + ("" if ref is None or ref.lengths is None else f", lengths {ref.lengths.tolist()}"))
    print(header)
    if lines:
        print("\n".join(lines))
    worst = max(errs, default=0.0)
    if worst > args.atol:
        print(f"FAILED: max abs error {worst:.2e} > --atol {args.atol:g}")
        return 1
    if why:
        print(f"NOT CHECKED against the model's source: {why}")
        return NOT_CHECKED
    print(f"ok: every error within --atol {args.atol:g}")
    return 0


# -- bench ---------------------------------------------------------------------------------------

def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure step latency and throughput on this machine",
        description="Time MODEL on random inputs: the latency of one streaming step (a session fed one "
                    "timestep at a time; median and 99th percentile) and the throughput of whole sequences "
                    "through model.forward.",
        epilog=f"example: {PROG} bench model.safetensors --batch 8 --steps 128 --threads 1",
    )
    p.add_argument("model", metavar="MODEL", help="a model file")
    p.add_argument("--batch", type=int, default=1, metavar="B", help="sequences run together (default 1)")
    p.add_argument("--steps", type=int, default=100, metavar="T", help="steps per sequence (default 100)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="threads to use (default: every core)")
    p.add_argument("--seconds", type=float, default=1.0, metavar="S",
                   help="time to spend on each measurement, about (default 1)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .stream import check_streamable

    model = _load_model(args.model, args.threads)
    B, T = _positive(args.batch, "--batch"), _positive(args.steps, "--steps")
    budget = max(args.seconds, 0.01)
    x = _random_input(model, B, T, np.random.default_rng(0))
    kind = ", ".join(f"{type(layer).__name__} {layer.hidden_size}" for layer in model.recurrent_layers)
    print(f"{args.model}: {kind or 'no recurrent layer'}; batch {B}, {T} steps, {model.threads} thread(s), "
          f"{model.dtype}")
    perf = time.perf_counter
    try:
        check_streamable(model, "streaming")
    except ValueError as exc:
        print(f"streaming step:  n/a ({str(exc).split(';')[0]})")
    else:
        session = model.session(B)
        first = x if not isinstance(x, tuple) else x[0]
        axis = session._streamer.inputs[0][1]
        columns = [np.ascontiguousarray(np.take(first, t, axis=axis)) for t in range(T)]
        if isinstance(x, tuple):
            raise UserError("bench: streaming a model of several inputs is not timed here")
        for col in columns[: min(T, 10)]:
            session.step(col)
        times = []
        deadline = perf() + budget
        while perf() < deadline or len(times) < 100:
            session.reset()
            for col in columns:
                t0 = perf()
                session.step(col)
                times.append(perf() - t0)
        us = np.array(times) * 1e6
        print(f"streaming step:  median {np.median(us):9.1f} us   p99 {np.percentile(us, 99):9.1f} us   "
              f"({B / np.median(us) * 1e6:,.0f} sequence-steps/s, {len(us)} steps timed)")
    model.forward(x)
    runs = []
    deadline = perf() + budget
    while perf() < deadline or len(runs) < 3:
        t0 = perf()
        model.forward(x)
        runs.append(perf() - t0)
    ms = np.array(runs) * 1e3
    print(f"whole sequence:  median {np.median(ms):9.3f} ms   p99 {np.percentile(ms, 99):9.3f} ms   "
          f"({B * T / np.median(ms) * 1e3:,.0f} sequence-steps/s, {len(ms)} runs)")
    return 0


# -- gates ---------------------------------------------------------------------------------------

LAGS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def add_gates(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gates", help="draw the gates at work and measure how far back the model remembers",
        description="Run MODEL over one sequence of INPUT.npy recording every gate, draw the gates of each "
                    "recurrent layer as heatmaps over time into -o (needs matplotlib: pip install "
                    'matplotlib, or pip install ".[plot]" from a checkout), and print per layer the memory horizon (steps until the running '
                    "product of the forget gate, GRU: update gate, falls below 1/e, averaged over units) and "
                    "the gradient flow ||dc_T/dc_t|| and ||dh_T/dh_t|| (spectral norms of exact Jacobian "
                    "products of the loaded weights) for t going back from the last step T.",
        epilog=f"example: {PROG} gates model.safetensors x.npy -o gates.png --row 0",
    )
    p.add_argument("model", metavar="MODEL", help="a model file")
    p.add_argument("input", metavar="INPUT.npy",
                   help="(batch, steps, features) floats or (batch, steps) token ids; one sequence may drop batch")
    p.add_argument("-o", "--output", metavar="PNG", help="where to draw the heatmaps (.png, .pdf, .svg)")
    p.add_argument("--row", type=int, default=0, help="which sequence of the batch to look at (default 0)")
    p.set_defaults(func=run_gates)


def run_gates(args: argparse.Namespace) -> int:
    import numpy as np

    from . import gates

    model = _load_model(args.model)
    x = _load_array(args.input, "the input")
    given = x.shape
    if x.ndim == (1 if model.takes_ids else 2):
        x = x[None]
    _check_input(model, x, args.input, given)
    if not 0 <= args.row < x.shape[0]:
        raise UserError(f"--row: expected 0..{x.shape[0] - 1} (the input has {x.shape[0]} sequences), got {args.row}")
    if not model.recurrent_layers:
        raise UserError(f"{args.model}: the model has no recurrent layer")
    if args.output:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UserError('drawing needs matplotlib: pip install matplotlib (from an lstm_engine checkout: '
                            'pip install ".[plot]"), or leave out -o') from None
    x = x[args.row:args.row + 1]
    if not model.takes_ids:
        x = x.astype(model.dtype, copy=False)
    T = x.shape[1]
    reports = gates.analyse(model, x)
    for rep in reports:
        layer = rep.layer
        size = f"hidden {layer.hidden_size}" + (f", proj {layer.proj_size}" if layer.proj_size else "")
        dirs = " bidirectional" if layer.bidirectional else ""
        print(f"layer {rep.index} {rep.kind} ({size}{dirs}), sequence {args.row}, {T} steps")
        means = "  ".join(f"{name} {np.nanmean(rep.gates[name]):.3f}" for name in gates.GATES[rep.kind]
                          if name in "ifozr")
        if means:
            print(f"  mean gate          {means}")
        if rep.horizon is None:
            print("  memory horizon     - (no gate: a vanilla RNN keeps nothing by design)")
        else:
            gate = gates.KEEP_GATE[rep.kind]
            values = ", ".join(f"{v:.1f}" for v in rep.horizon)
            print(f"  memory horizon     {values} steps (running product of {gate} below 1/e; at most {T})")
        lags = [k for k in LAGS if k <= T]
        print("  gradient flow  k = " + "".join(f"{k:>10}" for k in lags))
        for key in ("c", "h"):
            if key in rep.flow:
                for d in range(rep.flow[key].shape[0]):
                    label = f"|d{key}_T/d{key}_T-k|" + (f" dir {d}" if layer.bidirectional else "")
                    print(f"    {label:<16}" + "".join(f"{rep.flow[key][d, 0, k]:10.3g}" for k in lags))
    if args.output:
        labels = None
        vocab = model.metadata.get("vocab")
        if model.takes_ids and isinstance(vocab, str) and x.max() < len(vocab):
            labels = [vocab[i] for i in x[0]]
        gates.plot(reports, args.output, labels=labels, title=f"{os.path.basename(args.model)}: sequence {args.row}")
        print(f"wrote {args.output}")
    return 0


# -- quantize ------------------------------------------------------------------------------------

def add_quantize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize", help="store a model's weights as int8, float16 or bfloat16",
        description="Load MODEL (any format lstm_engine reads), store the weights of its LSTM/GRU/RNN, Dense "
                    "and Embedding layers as --dtype (int8: dynamic quantization, one scale per output row; "
                    "float16/bfloat16: 16-bit storage) and save the result as an lstm_engine file OUT. Check "
                    f"it with: {PROG} verify OUT --source MODEL.",
        epilog=f"example: {PROG} quantize model.safetensors model-int8.safetensors --dtype int8 --keep-float Dense",
    )
    p.add_argument("model", metavar="MODEL", help="the float model file")
    p.add_argument("output", metavar="OUT", help="where to write the quantized model (.safetensors)")
    p.add_argument("--dtype", required=True, choices=("int8", "float16", "bfloat16"), help="how to store the weights")
    p.add_argument("--keep-float", nargs="+", default=[], metavar="NAME",
                   help="layers left float32: a class name (Dense, Embedding, LSTM...), layers.N or N")
    p.add_argument("--per-tensor", action="store_true", help="int8: one scale per matrix instead of per row")
    p.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    from . import quantize, save

    model = _load_model(args.model)
    keep = [int(k) if k.lstrip("-").isdigit() else k for k in args.keep_float]
    q = quantize(model, args.dtype, keep_float=keep, per_channel=not args.per_tensor)
    save(q, args.output)
    before, after = os.path.getsize(args.model), os.path.getsize(args.output)
    kinds = ", ".join(f"layers.{i} {type(layer).__name__}: {layer.quantization.format if layer.quantization else 'float32'}"
                      for i, layer in enumerate(q.layers) if layer.weights())
    print(f"{args.output}: {_bytes(after)} (from {_bytes(before)}, {after / before:.0%}); {kinds}")
    return 0


# -- serve ---------------------------------------------------------------------------------------

def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve", help="serve a model's streams over HTTP and WebSocket (needs the [serve] extra)",
        description="Serve MODEL: one stateful stream per client over HTTP and WebSocket, the concurrent steps "
                    "of all streams batched by one stream pool. With --state-dir every answered step is on disk "
                    "before its answer, so a restart resumes every stream; with --token-file every request needs "
                    "a bearer token and a stream belongs to the token that created it. Binds to loopback unless "
                    "--host says otherwise.",
        epilog=f"example: {PROG} serve model.safetensors --state-dir states --token-file tokens.txt",
    )
    p.add_argument("model", help="the model file (any format lstm_engine loads)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0 picks a free one)")
    p.add_argument("--max-batch", type=int, default=64, metavar="N", help="most steps run as one batch (default 64)")
    p.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                   help="seconds after which an idle stream leaves the pool for its saved state (default 600)")
    p.add_argument("--state-dir", default=None, metavar="DIR",
                   help="keep every stream's state here: each answered step's new state is in a write-ahead log "
                        "(fsynced, shared by concurrent requests) before its answer; a restart resumes every stream")
    p.add_argument("--max-log-bytes", type=int, default=64 << 20, metavar="BYTES",
                   help="with --state-dir: the log's size past which every state goes to its checkpoint file and "
                        "the log starts again (default 64 MiB; bounds the disk and the replay at start)")
    p.add_argument("--token-file", default=None, metavar="FILE",
                   help="bearer tokens, one per line; every request must carry one. Read again when the file "
                        "changes (or on SIGHUP): removed tokens are refused from then on")
    p.add_argument("--max-body", type=int, default=16 << 20, metavar="BYTES",
                   help="largest request body or WebSocket message (default 16 MiB)")
    p.add_argument("--max-chunk", type=int, default=4096, metavar="STEPS",
                   help="most steps in one request, and tokens in one generate (default 4096)")
    p.add_argument("--max-streams-per-token", type=int, default=1000, metavar="N",
                   help="open streams one token may hold (default 1000)")
    p.add_argument("--rate-limit", type=float, default=1000.0, metavar="R",
                   help="requests a second per token, with --token-file (default 1000; 0: no limit)")
    p.add_argument("--max-queue", type=int, default=1024, metavar="N",
                   help="step requests waiting at once before new ones get 503 (default 1024)")
    p.add_argument("--threads", type=int, default=None, help="threads the model may use (default: all cores)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="server log level (default warning)")
    p.add_argument("--server", default="uvicorn", choices=["uvicorn", "granian"],
                   help="the HTTP/WebSocket server: uvicorn (default) or granian (Rust protocols off the event "
                        "loop; pip install granian)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    import ipaddress

    try:
        from . import serve
    except ImportError as exc:
        raise UserError(str(exc)) from None
    if args.server == "granian" and importlib.util.find_spec("granian") is None:
        raise UserError("--server granian needs granian: pip install granian (from an lstm_engine checkout: "
                        "pip install '.[serve,granian]')")
    for name in ("max_batch", "max_body", "max_chunk", "max_streams_per_token", "max_queue", "max_log_bytes"):
        _positive(getattr(args, name), "--" + name.replace("_", "-"))
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port: expected 0..65535, got {args.port}")
    if not args.idle_timeout > 0:
        raise UserError(f"--idle-timeout: expected seconds > 0, got {args.idle_timeout}")
    if not args.rate_limit >= 0:
        raise UserError(f"--rate-limit: expected requests a second >= 0, got {args.rate_limit}")
    if args.token_file is not None and not os.path.isfile(args.token_file):
        raise UserError(f"{args.token_file}: no such file")
    model = _load_model(args.model, args.threads)
    limits = serve.Limits(max_body=args.max_body, max_chunk=args.max_chunk,
                          max_streams_per_token=args.max_streams_per_token, rate=args.rate_limit,
                          max_queue=args.max_queue)
    try:
        sock = serve.bind(args.host, args.port)
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    try:
        server = serve.Server(model, max_batch=args.max_batch, idle_timeout=args.idle_timeout,
                              state_dir=args.state_dir, token_file=args.token_file, limits=limits,
                              max_log_bytes=args.max_log_bytes)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"{PROG} serve: warning: listening on {host}, reachable from other machines"
              + ("" if args.token_file else " and open to anyone (no --token-file)"), file=sys.stderr)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def ready() -> None:
        print(f"{PROG} serve: {len(server.store.entries)} streams, listening on {url}", file=sys.stderr, flush=True)

    serve.run(server, sock, log_level=args.log_level, on_ready=ready, http_server=args.server)
    return 0


# -- the command ---------------------------------------------------------------------------------

# Subcommands, in the order --help lists them.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_generate, add_inspect, add_run, add_verify, add_bench, add_gates, add_quantize, add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="Run LSTM, GRU and RNN models exported from PyTorch or Keras.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of every error (also LSTM_ENGINE_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import is_user_error

    debug = args.debug or os.environ.get("LSTM_ENGINE_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except BrokenPipeError:
        return _broken_pipe()
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except Exception as exc:
        if debug or not (isinstance(exc, (UserError, OSError)) or is_user_error(exc)):
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1


def _broken_pipe() -> int:
    # The reader went away (e.g. `| head`): stop quietly, and keep Python from complaining when it
    # flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 1


if __name__ == "__main__":
    sys.exit(main())
