"""Shared test setup: the NumPy reference and helpers.py live beside the tests; the kernel-variant fixtures."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# Keras 3 runs on the torch backend in every test that uses it.
os.environ.setdefault("KERAS_BACKEND", "torch")
# Ray instances the tests start (here and in the commands they run) listen on 127.0.0.1 only; Ray reads this
# when it is imported (see lstm_engine.ray.init_local).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Every run draws the same examples (seeded from each test's name, not from a clock, hash() or set order),
# and no example database replays earlier failures: a run's outcome depends on the code alone, so the
# suite gives the same outcomes under any PYTHONHASHSEED (.ci/run checks two).
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


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
