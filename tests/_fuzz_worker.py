"""Subprocess side of the loader fuzzing (tests/test_fuzz_loaders.py): load files, report each outcome.

Reads one JSON object from stdin: {"cases": [[case_id, path], ...], "headroom": bytes}. Before each case it
prints ``start <id>``; after it, one JSON line ``{"id", "outcome", "detail", "peak_growth"}`` (how far
the case raised the process's peak resident memory, in bytes). A case that kills
the process (a segfault) or never finishes is the one started last: the parent sees the exit status or its
deadline pass. Address space is capped at what the imports took plus ``headroom``, so an allocation that a
file's size does not justify fails instead of swapping the machine, and a MemoryError anywhere in an error's
chain is reported as the loader having tried it.

Outcomes: "loaded" (the model loaded and ran a forward pass), "load_error" (a LoadError naming the file),
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
from lstm_engine.cli import UserError, _random_input
from lstm_engine.formats import keras as _keras  # noqa: F401 - imported before the address-space cap
from lstm_engine.formats import _torch_pickle  # noqa: F401


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
        model.forward(x)


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
