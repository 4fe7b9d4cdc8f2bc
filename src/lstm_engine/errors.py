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
