"""The zoo's fetching: a registry out of reach is the only reason to skip; anything else is an error."""

from __future__ import annotations

import pytest
import zoo_packages

pytestmark = pytest.mark.zoo


def test_unreachable_index_is_reported_as_such(tmp_path, monkeypatch):
    monkeypatch.setenv("LSTM_ENGINE_ZOO_CACHE", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # the discard port: nothing listens
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        monkeypatch.setenv(name, "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    with pytest.raises(zoo_packages.Unreachable, match=r"g2p-en==2\.1\.0"):
        zoo_packages.fetch("g2p-en", "2.1.0")
    assert not list(tmp_path.glob("downloads/*/*"))  # nothing half-downloaded left behind


def test_a_version_that_does_not_exist_is_an_error(zoo, tmp_path, monkeypatch):
    zoo("g2p-en", "2.1.0")  # skips here if the index cannot be reached
    monkeypatch.setenv("LSTM_ENGINE_ZOO_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"pip download g2p-en==0\.0\.0\.1 failed") as info:
        zoo_packages.fetch("g2p-en", "0.0.0.1")
    assert not isinstance(info.value, zoo_packages.Unreachable)
