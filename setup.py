"""Build the Cython kernels.

Compiler directives live here, in one place. LSTM_ENGINE_DEBUG=1 builds a debug variant with
bounds, wraparound and initialisation checks on (CI runs the test suite against it too).
"""
import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("LSTM_ENGINE_DEBUG", "") not in ("", "0")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": not DEBUG,
    "embedsignature": True,
}
# -O3 but never -march=native: wheels must run on any x86-64 (SIGILL otherwise). The AVX2/FMA
# and AVX-512 variants in cpu_products.c carry their own target attributes and are picked by a run-time CPU check.
# -fno-trapping-math lets GCC turn the activations' clamps into vector blends (results are the
# same: nothing here enables FP traps); without it the gate loops stay scalar.
compile_args = (["-O0", "-g"] if DEBUG else ["-O3", "-fno-trapping-math"]) + ["-pthread"]

# Timestamps cannot tell a debug build from an optimised one: without this, switching modes in one
# tree reuses the other mode's generated C and compiled module. The stamp changes only when the mode
# does; Cython is forced to regenerate then, and the compiler reruns because the stamp is a dependency.
MODE_STAMP = os.path.join("build", "lstm_engine_build_mode")
mode = "debug" if DEBUG else "optimised"
try:
    with open(MODE_STAMP) as f:
        mode_changed = f.read() != mode
except OSError:
    mode_changed = True
if mode_changed:
    os.makedirs(os.path.dirname(MODE_STAMP), exist_ok=True)
    with open(MODE_STAMP, "w") as f:
        f.write(mode)

# The C kernels, one file per concern (_cpu.h lists them).
C_PARTS = ("detect", "products", "steps", "pool", "blas", "quant", "conv")

extensions = [
    Extension(
        "lstm_engine._kernels",
        ["src/lstm_engine/_kernels.pyx", "src/lstm_engine/_gates_general.c"]
        + [f"src/lstm_engine/cpu_{part}.c" for part in C_PARTS],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        depends=["src/lstm_engine/_cpu.h", "src/lstm_engine/_quant.h", "src/lstm_engine/_cpu_impl.h",
                 "src/lstm_engine/_kernels.pxd", "src/lstm_engine/_activations.h", "src/lstm_engine/_cells.h", "src/lstm_engine/_gates_general.h",
                 MODE_STAMP],
        extra_compile_args=compile_args,
        extra_link_args=["-pthread"],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, force=mode_changed))
