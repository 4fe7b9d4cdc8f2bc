"""Exceptions raised by lstm_engine."""


class LoadError(ValueError):
    """A model file could not be loaded: it is malformed, truncated, or describes something unsupported.

    The message names the file and, where one is at fault, the tensor or layer.
    """


class UnsafeModelError(LoadError):
    """A model file asks to run code or build objects that a weights file never needs (pickle globals)."""
