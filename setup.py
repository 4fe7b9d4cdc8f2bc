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
# -O3 but never -march=native: wheels must run on any x86-64 (SIGILL otherwise).
compile_args = ["-O0", "-g"] if DEBUG else ["-O3"]

extensions = [
    Extension(
        "lstm_engine._kernels",
        ["src/lstm_engine/_kernels.pyx"],
        include_dirs=[numpy.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=compile_args,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives))
