"""Shared test setup: the NumPy reference lives beside the tests."""
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# Keras 3 runs on the torch backend in every test that uses it.
os.environ.setdefault("KERAS_BACKEND", "torch")
