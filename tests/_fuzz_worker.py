"""Subprocess side of the loader fuzzing (tests/test_fuzz_loaders.py): load files, report each outcome.

Reads one JSON object from stdin: {"cases": [[case_id, path], ...], "headroom": bytes}. Before each case it
prints ``start <id>``; after it, one JSON line ``{"id", "outcome", "detail", "peak_growth"}`` (how far
the case raised the process's peak resident memory, in bytes). A case that kills
the process (a segfault) or never finishes is the one started last: the parent sees the exit status or its
deadline pass. Address space is capped at what the imports took plus ``headroom``, so an allocation that a
file's size does not justify fails instead of swapping the machine, and a MemoryError anywhere in an error's
chain is reported as the loader having tried it.

Outcomes: "loaded" (the model loaded, and a forward pass gave outputs in the declared shape and dtype, one
state per recurrent layer, and the same answer twice), "wrong" (it ran but broke one of those), "load_error" (a LoadError naming the file),
"unnamed" (a LoadError whose message misses the path), "alloc" (MemoryError behind the error), "forward"
(a loaded model whose forward pass raised), "other" (any other exception), "graph_refused" (a graph
model whose forward raised ValueError or TypeError naming the node at fault: a graph's value shapes
are known only once an input arrives, so a mutated attribute may show only then).
"""
import json
import resource
import sys

import h5py  # noqa: F401 - imported before the address-space cap
import numpy as np

import lstm_engine as le
from lstm_engine.cli import _random_input
from lstm_engine.errors import UserError
from lstm_engine.formats import keras as _keras  # noqa: F401 - imported before the address-space cap
from lstm_engine.formats import _torch_pickle  # noqa: F401

try:  # ONNX files: the onnx package (and its shape inference) loaded before the cap too
    import onnx  # noqa: F401
    from lstm_engine.formats import onnx as _onnx  # noqa: F401
except ImportError:
    pass


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_error_in_chain(exc: BaseException) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MemoryError):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def _forward(model) -> None:
    """Run a loaded model on a small valid input: a model that loads must run."""
    rng = np.random.default_rng(0)
    if not model.is_chain:
        declared = [[d if isinstance(d, int) else 3 for d in v.shape] for v in model.graph.inputs]
        if any(np.prod(shape, dtype=np.float64) > 1 << 16 for shape in declared):
            return  # an input the file declares this large is the caller's to give, not the harness's
        try:
            x = _random_input(model, 2, 3, rng)  # the graph's inputs in their declared shapes
        except UserError:
            return  # an integer input that is not a table lookup: no valid input is known here
    elif model.takes_ids:
        n = model.layers[0].num_embeddings
        if not n:
            return  # an empty vocabulary admits no input at all
        x = rng.integers(0, n, (2, 3))
    else:
        x = rng.standard_normal((2, 3, model.input_size or 3)).astype(model.dtype)
    with np.errstate(all="ignore"):
        y, state = model.forward(x)
        again, _ = model.forward(x)
    _check_outputs(model, y, state, again)


class WrongAnswer(Exception):
    """A model that loaded and ran but answered in a shape it does not declare, or differently twice."""


def _leaves(structure, value):
    """The arrays of a forward's result in the order of the graph's output_structure; WrongAnswer if it
    nests differently."""
    if isinstance(structure, int):
        if not isinstance(value, np.ndarray):
            raise WrongAnswer(f"output {structure} is a {type(value).__name__}, not an array")
        return [value]
    if not isinstance(value, (tuple, list)) or len(value) != len(structure):
        raise WrongAnswer(f"outputs nest as {type(value).__name__}, the graph declares {structure!r}")
    return [leaf for s, v in zip(structure, value) for leaf in _leaves(s, v)]


def _check_outputs(model, y, state, again) -> None:
    """What a successful load promises: outputs as the model declares them (a chain: (2, 3, output_size) in
    its dtype; a graph: its output structure), one state per recurrent layer, the same answer twice."""
    if model.is_chain:
        # (batch, steps, output_size), or (batch, output_size) from a chain that keeps the last step only.
        wants = [(2, 3, model.output_size), (2, model.output_size)] if model.output_size is not None else []
        if (not isinstance(y, np.ndarray) or y.dtype != model.dtype or y.ndim not in (2, 3)
                or (wants and y.shape not in wants)):
            raise WrongAnswer(f"chain output {getattr(y, 'dtype', type(y))} {getattr(y, 'shape', '')}, "
                              f"expected {model.dtype} {' or '.join(map(str, wants)) or '(2, 3, ?)'}")
        leaves, twice = [y], [again]
    else:
        leaves, twice = _leaves(model.graph.output_structure, y), _leaves(model.graph.output_structure, again)
    if len(state) != len(model.recurrent_layers):
        raise WrongAnswer(f"{len(state)} states for {len(model.recurrent_layers)} recurrent layers")
    for a, b in zip(leaves, twice):
        if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"):
            raise WrongAnswer("two forward passes on the same input differ")


def run_case(path: str) -> tuple[str, str]:
    try:
        model = le.load(path)
    except le.LoadError as exc:
        if _memory_error_in_chain(exc):
            return "alloc", f"{type(exc).__name__}: {exc}"[:500]
        if path not in str(exc):
            return "unnamed", f"{type(exc).__name__}: {exc}"[:500]
        return "load_error", f"{type(exc).__name__}: {str(exc)[:300]}"
    except MemoryError as exc:
        return "alloc", f"MemoryError: {exc}"[:500]
    except Exception as exc:  # noqa: BLE001 - the point is to report every kind
        return "other", f"{type(exc).__name__}: {exc}"[:500]
    try:
        _forward(model)
    except WrongAnswer as exc:
        return "wrong", str(exc)[:500]
    except MemoryError as exc:
        return "alloc", f"MemoryError: {exc}"[:500]
    except (ValueError, TypeError) as exc:
        if not model.is_chain and "node '" in str(exc) and not _memory_error_in_chain(exc):
            return "graph_refused", f"{type(exc).__name__}: {str(exc)[:300]}"
        return "forward", f"{type(exc).__name__}: {exc}"[:500]
    except Exception as exc:  # noqa: BLE001
        return "forward", f"{type(exc).__name__}: {exc}"[:500]
    return "loaded", ""


def main() -> None:
    job = json.loads(sys.stdin.read())
    limit = _vm_size() + int(job["headroom"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for case_id, path in job["cases"]:
        print(f"start {case_id}", flush=True)
        before = _peak_rss()
        outcome, detail = run_case(path)
        growth = _peak_rss() - before
        print(json.dumps({"id": case_id, "outcome": outcome, "detail": detail, "peak_growth": growth}), flush=True)


if __name__ == "__main__":
    main()
