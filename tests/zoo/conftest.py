"""The ``zoo`` fixture: PyPI packages fetched into a cache (see zoo_packages.py); skips only when the index is out of reach."""

from __future__ import annotations

import pytest
from zoo_packages import Unreachable, fetch


@pytest.fixture(scope="session")
def zoo():
    """``zoo(name, version)`` -> the unpacked package folder."""
    def get(name: str, version: str):
        try:
            return fetch(name, version)
        except Unreachable as exc:
            pytest.skip(f"PyPI cannot be reached: {exc}")

    return get
