"""Every ```python block of README.md runs as written, in order, in one namespace (a block may build on the blocks
before it), in a scratch directory as working directory: what a reader pasting them one after another would see.

The only change made to a block: the serve clients' address. The server the README starts with
`lstm-engine serve builtin:charlm ... ` listens on port 8000; here a server started the same way listens on a free
port (other jobs may hold 8000), and ``127.0.0.1:8000`` in the blocks is replaced by its address.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
SERVE_ADDRESS = "127.0.0.1:8000"


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) of each ```python block."""
    blocks, code, start = [], None, 0
    for n, line in enumerate(text.splitlines(), 1):
        if code is None and re.fullmatch(r"```python\s*", line):
            code, start = [], n
        elif code is not None and line.strip() == "```":
            blocks.append((start, "\n".join(code) + "\n"))
            code = None
        elif code is not None:
            code.append(line)
    assert code is None, f"README.md:{start}: a ```python block is never closed"
    return blocks


BLOCKS = python_blocks(README.read_text("utf-8"))


def _marks(code: str) -> list:
    # Blocks that start local Dask or Ray clusters carry the suite's `cluster` marker.
    return [pytest.mark.cluster] if re.search(r"LocalCluster|\bimport ray\b|@ray\.remote", code) else []


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """The reader's session: one namespace and one working directory for all the blocks, and the server the
    README's `serve` command starts, once a block needs it."""
    import os

    workdir = tmp_path_factory.mktemp("readme")
    here = os.getcwd()
    # The blocks' libraries change the environment (Dask leaves OMP_NUM_THREADS=1, which caps the engine's
    # threads): later tests get back the one they had.
    environ = dict(os.environ)
    # Processes the blocks start (the server, Dask and Ray workers) find lstm_engine from the new directory too.
    pythonpath = os.environ.get("PYTHONPATH")
    if pythonpath:
        os.environ["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in pythonpath.split(os.pathsep) if p)
    os.chdir(workdir)
    state = {"namespace": {"__name__": "__readme__"}, "server": None, "workdir": workdir, "failed": None}
    try:
        yield state
    finally:
        os.chdir(here)
        os.environ.clear()
        os.environ.update(environ)
        if state["server"] is not None:
            state["server"].stop()
        ray = state["namespace"].get("ray")
        if ray is not None and getattr(ray, "is_initialized", lambda: False)():
            ray.shutdown()
        client = state["namespace"].get("client")
        if client is not None and hasattr(client, "close"):
            cluster = getattr(client, "cluster", None)   # the README's LocalCluster: closing the client leaves it up
            client.close()
            if cluster is not None:
                cluster.close()


def _serve(state) -> str:
    """The README's `lstm-engine serve builtin:charlm --state-dir states --token-file tokens.txt`, on a free port."""
    if state["server"] is None:
        from test_serve import Server

        assert (state["workdir"] / "tokens.txt").is_file(), "README: tokens.txt is made before the server starts"
        state["server"] = Server("builtin:charlm", "--state-dir", str(state["workdir"] / "states"),
                                 "--token-file", str(state["workdir"] / "tokens.txt"))
    return state["server"].url.removeprefix("http://")


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 15


@pytest.mark.timeout(600)
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")
@pytest.mark.parametrize("line,code", [pytest.param(n, c, id=f"README.md:{n}", marks=_marks(c)) for n, c in BLOCKS])
def test_readme_python_block(reader, line, code):
    if reader["failed"] is not None:
        pytest.skip(f"an earlier block failed (README.md:{reader['failed']}); this one builds on it")
    if SERVE_ADDRESS in code:
        (reader["workdir"] / "tokens.txt").exists() or _make_tokens(reader["workdir"])
        code = code.replace(SERVE_ADDRESS, _serve(reader))
    try:
        exec(compile(code, f"README.md:{line}", "exec"), reader["namespace"])
    except BaseException:
        reader["failed"] = line
        raise


def _make_tokens(workdir: Path) -> None:
    """What the README's shell block does before `lstm-engine serve`: one token a line."""
    import secrets

    (workdir / "tokens.txt").write_text(secrets.token_urlsafe(24) + "\n")
