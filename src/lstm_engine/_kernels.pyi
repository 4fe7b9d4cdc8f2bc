# Python-visible signatures of the compiled kernels (_kernels.pyx).
import numpy as np
import numpy.typing as npt

class RecurrentKernel:
    cell: int  # CELL_* code
    num_directions: int
    input_size: int
    hidden_size: int
    output_size: int  # proj_size or hidden_size
    num_gates: int
    act: int
    gate_act: int
    is_double: bool
    go_backwards: bool
    dtype: np.dtype
    threads: int  # threads a run may use (default: cpu_count())
    fast: bool  # float32 LSTM without projection / GRU (reset after) on the C kernels (cpu_steps.c)
    def __init__(
        self,
        cell: int,
        act: int,
        gate_act: int,
        w_ih: list[npt.NDArray[np.floating]],  # per direction (G*H, I)
        w_hh: list[npt.NDArray[np.floating]],  # per direction (G*H, P)
        w_hr: list[npt.NDArray[np.floating] | None],  # per direction (P, H)
        bias: list[npt.NDArray[np.floating]],  # per direction (G*H,)
        bias_hn: list[npt.NDArray[np.floating] | None],  # per direction (H,), GRU only
        go_backwards: bool = ...,
        quant: list[dict[str, PackedWeight]] | None = ...,  # per direction "ih", "hh", "hn", "hr" (quantized)
    ) -> None: ...
    @property
    def packed(self) -> tuple[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]], ...] | None: ...
    # per direction (w_ih, w_hh) as (P, K, G, 16) panels on the float32 fast path, else None
    weight_format: str  # "float32", "float64", or "int8" / "float16" / "bfloat16" for quantized products
    def work_size(self, batch: int, steps: int) -> int: ...
    def input_table(self, rows: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...
    # (V, I) -> (D, V, G*Hp): W_ih . row + bias per direction in packed order, for run(table=); fast only
    def run(
        self,
        x: npt.NDArray[np.floating] | npt.NDArray[np.intp],  # (B, T, I), or token ids (B, T) with table
        y: npt.NDArray[np.floating],  # (B, T, D*P), written
        h: npt.NDArray[np.floating],  # (D, B, P), read and written
        c: npt.NDArray[np.floating],  # (D, B, H), read and written (LSTM)
        mask: npt.NDArray[np.uint8] | None,  # (B, T)
        work: npt.NDArray[np.floating],  # (work_size,)
        zero_masked: bool,
        threads: int = ...,  # > 0 overrides self.threads for this call
        table: npt.NDArray[np.float32] | None = ...,  # from input_table: x holds token ids
        lengths: npt.NDArray[np.int32] | None = ...,  # (B,) valid steps per row, longest first; mask None
        y_rows: npt.NDArray[np.int32] | None = ...,  # (B,) the row of y each (sorted) row writes
    ) -> int: ...  # threads the step loop ran on (fast path: the C kernels' split; general loop: 1; empty: 0)

class ChainStep:
    # One step of [token table ->] recurrent layers -> Dense heads in one call (lstm_engine.plan.chain_step)
    def __init__(
        self,
        batch: int,
        table: npt.NDArray[np.float32] | None,  # (1, V, G*Hp) of the first kernel, or None: float input
        kernels: list[RecurrentKernel],
        states: list[tuple[npt.NDArray[np.float32], ...]],  # per layer (h,) or (h, c), (1, B, width)
        heads: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None, bool]],  # weight, bias, relu
        input_size: int,
    ) -> None: ...
    def step(self, x: object, out: object = ..., rows: int = ...) -> npt.NDArray | None: ...  # out (made if None); None, nothing touched: x or out not taken as is; rows <= batch: the first rows only

def take_rows(src: npt.NDArray, idx: npt.NDArray[np.intp], dst: npt.NDArray) -> None: ...  # dst[:len(idx)] = src[idx]
def put_rows(src: npt.NDArray, idx: npt.NDArray[np.intp], dst: npt.NDArray) -> None: ...  # dst[idx] = src[:len(idx)]
def stack_rows(xs: list, dst: npt.NDArray) -> bool: ...  # dst[i] = xs[i]; False (nothing written) if one does not fit as is

VARIANTS: tuple[str, ...]  # ("portable", "avx2", "avx512"): kernel variant names by level

def simd_level() -> int: ...  # the variant in use: 0 portable, 1 AVX2+FMA, 2 AVX-512
def set_simd_level(level: int | str | None) -> None: ...  # force a variant (ValueError if unsupported); -1/None: CPU check
def variant_supported(level: int | str) -> tuple[bool, str]: ...  # (runs here?, why or what is missing)
def cpu_info() -> dict[str, object]: ...  # cpu, variant, reason, variants, threads, threads_reason, pool
def pool_stats() -> dict[str, int | bool]: ...  # the pool's jobs: asked, split, why others ran alone
def dense_row(
    weight: npt.NDArray[np.float32],  # (N, K)
    x: npt.NDArray[np.float32],  # (K,)
    bias: npt.NDArray[np.float32] | None,  # (N,)
    out: npt.NDArray[np.float32],  # (N,), written and returned
    threads: int = 1,  # the engine's threads it may use
) -> npt.NDArray[np.float32]: ...
def magnitude(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...  # sqrt(a*a + b*b)
class Conv1d:  # ONNX Conv 1-D of one group, float32; reflect: a reflect Pad of (pad0, pad1) folded in
    weight: npt.NDArray[np.float32]  # (M, C * k)
    bias: npt.NDArray[np.float32] | None  # (M,)
    def __init__(self, weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32] | None, k: int,
                 stride: int = 1, dilation: int = 1, pad0: int = 0, pad1: int = 0, relu: bool = False,
                 reflect: bool = False) -> None: ...
    def __call__(
        self,
        x: npt.NDArray[np.float32],  # (N, C, L), unit stride along L
        out: npt.NDArray[np.float32] | None = None,  # (N, M, Lo), unit stride along Lo; written and returned
    ) -> npt.NDArray[np.float32]: ...
def cpu_count() -> int: ...  # cores this process may use: affinity mask, cgroup quota, OMP_NUM_THREADS
def blas_threads() -> int: ...  # OpenBLAS thread count (process-wide), 0 if no OpenBLAS was found
def set_blas_threads(n: int) -> None: ...
def set_parallel_min_bytes(n: int) -> int: ...  # returns the previous threshold
def fast_tanh(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...  # 1-D, the kernels' tanh
def fast_sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]: ...

# int8 / float16 / bfloat16 weights (cpu_quant.c, lstm_engine.quantize)
WEIGHT_KINDS: dict[str, int]
QUANT_VARIANTS: tuple[str, ...]  # ("portable", "avx2", "avxvnni", "avx512vnni")
MAX_QUANT_COLUMNS: int

class PackedWeight:
    kind: str
    rows: int
    cols: int
    nbytes: int
    def __init__(
        self,
        kind: str,  # "int8", "float16" or "bfloat16"
        weight: npt.NDArray[np.int8] | npt.NDArray[np.uint16],  # (N, K): int8 values or half-float bits
        scale: npt.NDArray[np.float32] | None = ...,  # (N,) int8 row scales
    ) -> None: ...

def dense_packed(
    weight: PackedWeight,
    x: npt.NDArray[np.float32],  # (M, K)
    bias: npt.NDArray[np.float32] | None,  # (N,)
    out: npt.NDArray[np.float32],  # (M, N), written and returned
    threads: int = ...,
) -> npt.NDArray[np.float32]: ...
def quant_variant() -> str: ...
def set_quant_variant(level: int | str | None) -> None: ...  # None or -1: dispatch
def quant_variant_supported(level: int | str) -> tuple[bool, str]: ...

def bounds_checked() -> bool: ...  # True in the LSTM_ENGINE_DEBUG=1 build
