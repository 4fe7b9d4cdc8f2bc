"""Helpers shared by the test files: ``from helpers import run_cli``.

A module of its own rather than conftest.py: ``from conftest import ...`` picks whichever conftest was
imported first (tests/zoo has its own), so it breaks depending on which tests are collected.
"""
import sys
import threading
import tracemalloc
from contextlib import contextmanager


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


def byte_edits(data):
    """A hypothesis strategy: ``data`` with one to four of its bytes set to other values (a mutated file)."""
    from hypothesis import strategies as st

    def apply(edits):
        mutated = bytearray(data)
        for position, value in edits:
            mutated[position] = value
        return bytes(mutated)

    return st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=4).map(apply)
