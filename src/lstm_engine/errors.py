"""Exceptions raised by lstm_engine."""


class LoadError(ValueError):
    """A model file could not be loaded: it is malformed, truncated, or describes something unsupported.

    The message names the file and, where one is at fault, the tensor or layer.
    """


class UnsafeModelError(LoadError):
    """A model file asks to run code or build objects that a weights file never needs (pickle globals)."""


class UnsupportedOpError(LoadError):
    """A model uses an op (a torch function, an ONNX operator, a layer) the engine does not run.

    ``op`` is its name, ``source`` where it came from (module path and source line, or the ONNX node's
    name and op type), ``supported`` what the engine runs instead.
    """

    def __init__(self, op: str, source: str, supported: list[str] | tuple[str, ...]) -> None:
        self.op = op
        self.source = source
        self.supported = list(supported)
        super().__init__(f"{source}: op {op!r} is not supported by lstm_engine; supported ops: "
                         f"{', '.join(self.supported)}")

    def __reduce__(self):  # exceptions are pickled across processes (pool workers, multiprocessing)
        return type(self), (self.op, self.source, self.supported)


class UserError(Exception):
    """A mistake in what the user asked for (a CLI argument, a --source that does not match): the CLI
    reports it as one line, exit status 1."""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a message for the user rather than a bug: a LoadError, or a ValueError/TypeError
    that one of lstm_engine's own ``raise`` statements threw while validating an input.

    The engine validates every input in Python and raises ValueError/TypeError there (the brief's rule),
    so the statement that raised tells the two apart: the same exception types raised by NumPy, by
    Python itself (a wrong call, ``'X' object is not iterable``) or by a dependency are bugs and keep
    their traceback.
    """
    import linecache
    import os

    if isinstance(exc, LoadError):
        return True
    if not isinstance(exc, (ValueError, TypeError)):
        return False
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    package = os.path.dirname(os.path.abspath(__file__))
    if not os.path.abspath(filename).startswith(package + os.sep):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise ")
