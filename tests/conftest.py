"""Shared test setup: the NumPy reference lives beside the tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# Keras 3 runs on the torch backend in every test that uses it.
os.environ.setdefault("KERAS_BACKEND", "torch")
# Ray instances the tests start (here and in the commands they run) listen on 127.0.0.1 only; Ray reads this
# when it is imported (see lstm_engine.ray.init_local).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import threading  # noqa: E402
import tracemalloc  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402


def run_threads(target, n, timeout=150):
    """Run target(i) in n threads started together; re-raise the first error; fail on a thread still alive."""
    errors = []
    start = threading.Barrier(n)

    def wrap(i):
        try:
            start.wait()
            target(i)
        except BaseException as exc:  # reported in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread is still running: deadlock or livelock"
    if errors:
        raise errors[0]


@contextmanager
def allocates_less_than(limit):
    """The block's peak Python-tracked allocation stays under ``limit`` bytes (hostile sizes refused early)."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes, expected under {limit}"


def run_cli(*args, cwd=None, env=None, timeout=240):
    """``python -m lstm_engine.cli ARGS`` in a subprocess (it inherits PYTHONPATH and KERAS_BACKEND)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "lstm_engine.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=timeout)


def run_main(capsys, *args):
    """The same command in this process (no interpreter start-up), as a CompletedProcess: for the many small cases."""
    import subprocess

    from lstm_engine.cli import main

    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's usage errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture(params=["portable", "avx2", "avx512"])
def kernel_variant(request):
    """Run the test with each float32 kernel variant forced; skipped, naming what is missing, where
    this CPU cannot run it."""
    from lstm_engine import _kernels

    supported, why = _kernels.variant_supported(request.param)
    if not supported:
        pytest.skip(f"{request.param} kernels cannot run here: {why}")
    _kernels.set_simd_level(request.param)
    yield request.param
    _kernels.set_simd_level(None)


@pytest.fixture(params=["portable", "avx2", "avxvnni", "avx512vnni"])
def quant_variant(request):
    """Each int8/float16/bfloat16 product variant (lstm_engine.quantize) forced in turn; skipped, naming
    what is missing, where this CPU cannot run it."""
    from lstm_engine import _kernels

    supported, why = _kernels.quant_variant_supported(request.param)
    if not supported:
        pytest.skip(f"{request.param} products cannot run here: {why}")
    _kernels.set_quant_variant(request.param)
    yield request.param
    _kernels.set_quant_variant(None)
