# Recurrent kernels: BLAS for the products, one fused loop per timestep for the gates.
#
# Everything here assumes valid input: the Python layer checks dtypes, shapes and contiguity
# before calling. The only checks kept are buffer sizes, so that a caller bug raises instead of
# writing out of bounds.
cimport numpy as cnp
import numpy as np
from libc.math cimport exp, expf, log1p, log1pf, tanh, tanhf
from cpython.pycapsule cimport PyCapsule_GetName, PyCapsule_GetPointer
from libc.string cimport memcpy, memset

cnp.import_array()

cdef extern from "_cpu.h" nogil:
    enum:
        LE_PORTABLE
        LE_AVX2
        LE_AVX512
        LE_NUM_VARIANTS
        LE_PANEL
        LE_CHAIN_MAX
    int le_simd_level()
    int le_simd_detected()
    int le_simd_forced()
    int le_set_simd_level(int level)
    const char* le_simd_name(int level)
    const char* le_simd_reason(int level)
    void le_tanh_f32(const float* x, float* y, Py_ssize_t n)
    void le_sigmoid_f32(const float* x, float* y, Py_ssize_t n)
    Py_ssize_t le_packed_size(int G, int H, int K)
    void le_pack_f32(const float* W, int G, int H, int K, float* out)
    void le_pack_bias_f32(const float* b, int G, int H, float* out)
    ctypedef struct le_steps_args:
        int cell, B, In, H, T, reverse, zero_masked
        const float* x
        const unsigned char* mask
        float* y
        Py_ssize_t y_row, y_step
        float* h
        float* c
        const float* w_ih
        const float* w_hh
        const float* bias
        const float* bias_hn
        float* work
        const float* table
        const Py_ssize_t* ids
        const int* lengths
        const int* y_rows
    Py_ssize_t le_steps_work_size(int cell, int B, int H, int T)
    void le_project_f32(int cell, int H, int In, const float* x, int rows, const float* w_ih, const float* bias,
                        float* out)
    int le_run_steps_f32(le_steps_args* args, int nthreads)
    int le_run_chain_f32(le_steps_args* layers, const int* nthreads, int n)
    int le_cpu_count()
    const char* le_cpu_count_reason()
    enum:
        LE_POOL_NSTATS
    void le_pool_stats(long* out, int* cores, int* contended)
    int le_pool_contention(long until, double others, int cores, int* left)
    void le_pool_set_join_delay(long ns)
    int le_blas_bind()
    int le_blas_threads()
    void le_blas_set_threads(int n)
    int le_gemv_f32(int N, int K, const float* W, Py_ssize_t ldw, const float* x, const float* b, float* y,
                    int nthreads)
    ctypedef struct le_conv1d_args:
        int N, C, L, M, k, stride, dilation, pad0, Lo, relu, reflect
        const float* x
        Py_ssize_t x_n, x_c
        const float* W
        const float* Wp
        const float* b
        float* y
        Py_ssize_t y_n, y_m
        float* cols
    int le_conv1d_f32(const le_conv1d_args* args)
    Py_ssize_t le_conv1d_packed_size(int M, int K)
    void le_conv1d_pack(int M, int K, const float* W, float* Wp)
    void le_magnitude_f32(Py_ssize_t n, const float* a, const float* b, float* out)

cdef extern from "_gates_general.h" nogil:
    ctypedef struct le_activation:
        int code
        double alpha, beta
    ctypedef struct le_gate_options:
        le_activation gate, act, cell_act
        double clip
        int input_forget
        const void* peephole
    void le_lstm_general_f32(const le_gate_options* o, int H, const float* q, const float* bias, float* c,
                             float* h)
    void le_lstm_general_f64(const le_gate_options* o, int H, const double* q, const double* bias, double* c,
                             double* h)
    void le_gru_general_f32(const le_gate_options* o, int H, const float* xq, const float* hq, const float* bias,
                            const float* bias_hn, float* h)
    void le_gru_general_f64(const le_gate_options* o, int H, const double* xq, const double* hq,
                            const double* bias, const double* bias_hn, double* h)
    void le_gru_before_gates_f32(const le_gate_options* o, int H, const float* xq, float* hq, const float* bias,
                                 const float* h, float* rh)
    void le_gru_before_gates_f64(const le_gate_options* o, int H, const double* xq, double* hq,
                                 const double* bias, const double* h, double* rh)
    void le_gru_before_output_f32(const le_gate_options* o, int H, const float* xq, const float* hq,
                                  const float* bias, float* h)
    void le_gru_before_output_f64(const le_gate_options* o, int H, const double* xq, const double* hq,
                                  const double* bias, double* h)
    void le_rnn_general_f32(const le_gate_options* o, int H, const float* q, const float* bias, float* h)
    void le_rnn_general_f64(const le_gate_options* o, int H, const double* q, const double* bias, double* h)
    double le_activate_f64(const le_activation* a, double x)
# int8 / float16 / bfloat16 weight products (cpu_quant.c; Python side: lstm_engine.quantize).
cdef extern from "_quant.h" nogil:
    enum:
        LE_W_INT8
        LE_W_FLOAT16
        LE_W_BFLOAT16
        LE_Q_NUM_VARIANTS
        LE_Q_MAX_K
    ctypedef struct le_qmat:
        int kind, N, K
        const void* w
        const float* scale
        const int* comp
    Py_ssize_t le_qmat_size(int kind, int N, int K)
    void le_qmat_pack(int kind, const void* src, int N, int K, void* out, int* comp)
    int le_qgemm(const le_qmat* m, int M, const float* A, Py_ssize_t lda, float* C, Py_ssize_t ldc,
                 int accumulate, const float* bias, int nthreads, void* scratch)
    Py_ssize_t le_qgemm_scratch(int M, int K)
    int le_qgemm_pair(const le_qmat* m1, const float* A1, Py_ssize_t lda1, float* C1, Py_ssize_t ldc1, int acc1,
                      const le_qmat* m2, const float* A2, Py_ssize_t lda2, float* C2, Py_ssize_t ldc2, int acc2,
                      int M, int nthreads, void* scratch)
    void le_q_embed_rows(int kind, const void* table, const float* scale, int E, const Py_ssize_t* ids, int B,
                         float* out)
    void le_q_lstm_gates(int H, float* q, const float* bias, float* c, float* h)
    void le_q_gru_gates(int H, float* q, const float* hq, const float* bias, const float* bias_hn, float* h)
    int le_q_level()
    int le_q_detected()
    int le_q_set_level(int level)
    int le_q_supported(int level)
    const char* le_q_name(int level)
    const char* le_q_reason(int level)

# SciPy's BLAS, bound at the first call that needs it rather than cimported: importing
# scipy.linalg (which its cython_blas lives in) takes 0.2-0.45 s here, most of the
# import budget, and float32 LSTM/GRU streaming never calls BLAS.
ctypedef void (*gemm_s)(char*, char*, int*, int*, int*, float*, float*, int*, float*, int*, float*,
                        float*, int*) noexcept nogil
ctypedef void (*gemm_d)(char*, char*, int*, int*, int*, double*, double*, int*, double*, int*, double*,
                        double*, int*) noexcept nogil
ctypedef void (*gemv_s)(char*, int*, int*, float*, float*, int*, float*, int*, float*, float*,
                        int*) noexcept nogil
ctypedef void (*gemv_d)(char*, int*, int*, double*, double*, int*, double*, int*, double*, double*,
                        int*) noexcept nogil
cdef gemm_s sgemm = NULL
cdef gemm_d dgemm = NULL
cdef gemv_s sgemv = NULL
cdef gemv_d dgemv = NULL


cdef void* blas_function(dict capi, str name) except NULL:
    capsule = capi[name]
    return PyCapsule_GetPointer(capsule, PyCapsule_GetName(capsule))


cdef int load_blas() except -1:
    global sgemm, dgemm, sgemv, dgemv
    from scipy.linalg import cython_blas

    capi = cython_blas.__pyx_capi__
    dgemm = <gemm_d>blas_function(capi, "dgemm")
    dgemv = <gemv_d>blas_function(capi, "dgemv")
    sgemv = <gemv_s>blas_function(capi, "sgemv")
    sgemm = <gemm_s>blas_function(capi, "sgemm")
    le_blas_bind()  # SciPy's OpenBLAS is loaded now: its thread count is ours to hold
    return 0


le_blas_bind()  # NumPy's OpenBLAS, which the Dense heads use

# Below this many bytes of weights read per step (times the batch) a run stays on one thread:
# waking a second core and waiting for it at the end of every step costs more than it saves (measured,
# see benches/RESULTS.md).
cdef Py_ssize_t parallel_min_bytes = 256 * 1024


cdef inline int threads_for(Py_ssize_t step_bytes, int threads) noexcept nogil:
    """The threads a product reading step_bytes of weights may use: one below parallel_min_bytes."""
    return threads if step_bytes >= parallel_min_bytes else 1


cdef int one_inc = 1

# ---------------------------------------------------------------------------------------------
# BLAS on row-major data. Column-major BLAS sees a row-major X as X^T, so C = A @ op(B) is
# computed as C^T = op(B)^T @ A^T.

cdef inline void gemm_nt(int M, int N, int K, floating* A, int lda, floating* Bm, int ldb,
                         floating beta, floating* C, int ldc) noexcept nogil:
    """C[M, N] = A[M, K] @ Bm[N, K]^T + beta * C (row-major, leading dimensions given)."""
    cdef char ta = b'T'
    cdef char tb = b'N'
    cdef floating one = 1
    if M == 1:
        # A single row: GEMV on the weight matrix is cheaper than GEMM's packing.
        if floating is float:
            sgemv(&ta, &K, &N, &one, Bm, &ldb, A, &one_inc, &beta, C, &one_inc)
        else:
            dgemv(&ta, &K, &N, &one, Bm, &ldb, A, &one_inc, &beta, C, &one_inc)
        return
    if floating is float:
        sgemm(&ta, &tb, &N, &M, &K, &one, Bm, &ldb, A, &lda, &beta, C, &ldc)
    else:
        dgemm(&ta, &tb, &N, &M, &K, &one, Bm, &ldb, A, &lda, &beta, C, &ldc)

# ---------------------------------------------------------------------------------------------
# Activations. A switch on a loop-invariant code: the compiler unswitches the gate loops.

cdef inline floating sigmoid(floating x) noexcept nogil:
    # exp overflows to inf for very negative x, giving exactly 0; never NaN.
    if floating is float:
        return 1.0 / (1.0 + expf(-x))
    else:
        return 1.0 / (1.0 + exp(-x))

cdef inline floating tanh_(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)

cdef inline floating clip01(floating x) noexcept nogil:
    return 0 if x < 0 else (1 if x > 1 else x)

cdef inline floating activate(floating x, int kind) noexcept nogil:
    if kind == ACT_SIGMOID:
        return sigmoid(x)
    if kind == ACT_TANH:
        return tanh_(x)
    if kind == ACT_RELU:
        if x < 0:
            return 0
        return x  # NaN stays NaN, as in torch.relu
    if kind == ACT_LINEAR:
        return x
    if kind == ACT_HARD_SIGMOID:
        return clip01(x / 6 + <floating>0.5)
    if kind == ACT_HARD_SIGMOID_V2:
        return clip01(<floating>0.2 * x + <floating>0.5)
    if kind == ACT_SOFTSIGN:
        return x / (1 + (x if x > 0 else -x))
    if kind == ACT_SOFTPLUS:
        # log(1 + e^x) without overflow for large x.
        if floating is float:
            return x + log1pf(expf(-x)) if x > 0 else log1pf(expf(x))
        else:
            return x + log1p(exp(-x)) if x > 0 else log1p(exp(x))
    if kind == ACT_ELU:
        if x > 0:
            return x
        if floating is float:
            return expf(x) - 1
        else:
            return exp(x) - 1
    # ACT_EXPONENTIAL
    if floating is float:
        return expf(x)
    else:
        return exp(x)


# ---------------------------------------------------------------------------------------------
# One layer, all directions.

cdef struct QW:
    # A quantized direction's packed products (NULL: float weights through BLAS). hh holds only the
    # r and z rows for a GRU with reset before, whose n rows (hn) multiply r * h.
    const le_qmat* ih
    const le_qmat* hh
    const le_qmat* hn
    const le_qmat* hr
    void* scratch  # twice le_qgemm_scratch bytes for the largest product of a run (set per run)


cdef inline void product(const QW* qw, const le_qmat* m, int M, int N, int K, floating* A, int lda, floating* Bm,
                         int ldb, floating beta, floating* C, int ldc, int threads) noexcept nogil:
    """gemm_nt, or the packed int8/float16/bfloat16 product when the direction has one (float32 only)."""
    if floating is float:
        if m != NULL:
            le_qgemm(m, M, A, lda, C, ldc, beta != 0, NULL, threads, qw.scratch)
            return
    gemm_nt(M, N, K, A, lda, Bm, ldb, beta, C, ldc)


cdef struct Dims:
    int cell, D, In, H, P, G, B, T  # 'I' would clash with complex.h's macro
    int act, gate_act
    bint zero_masked, go_backwards
    const le_gate_options* general  # per direction, or NULL: the fused loops below


cdef inline void masked_output(floating* y, Py_ssize_t row_stride, int s, int step_back,
                               int P, bint zero) noexcept nogil:
    """Output of a masked step: zeros, or a copy of the previous step's output (Keras)."""
    if zero or s == 0:
        memset(y, 0, P * sizeof(floating))
    else:
        memcpy(y, y + step_back * row_stride, P * sizeof(floating))


cdef inline void general_row(const le_gate_options* o, int cell, int H, floating* q, floating* hq,
                             floating* bias, floating* bias_hn, floating* c, floating* h,
                             floating* rh) noexcept nogil:
    """One row's gates through _gates_general.c (peepholes, clip, input_forget, parameterised activations)."""
    if floating is float:
        if cell == CELL_LSTM:
            le_lstm_general_f32(o, H, q, bias, c, h)
        elif cell == CELL_RNN:
            le_rnn_general_f32(o, H, q, bias, h)
        elif cell == CELL_GRU:
            le_gru_general_f32(o, H, q, hq, bias, bias_hn, h)
        else:
            le_gru_before_gates_f32(o, H, q, hq, bias, h, rh)
    else:
        if cell == CELL_LSTM:
            le_lstm_general_f64(o, H, q, bias, c, h)
        elif cell == CELL_RNN:
            le_rnn_general_f64(o, H, q, bias, h)
        elif cell == CELL_GRU:
            le_gru_general_f64(o, H, q, hq, bias, bias_hn, h)
        else:
            le_gru_before_gates_f64(o, H, q, hq, bias, h, rh)


cdef struct GeneralWork:
    # Offsets into the general loop's work buffer, in elements of the kernel's dtype, and its size.
    Py_ssize_t xp, hp, tmp, hnew, quant, size


cdef inline GeneralWork general_work(Py_ssize_t B, Py_ssize_t T, Py_ssize_t GH, Py_ssize_t H, Py_ssize_t P,
                                     Py_ssize_t quant) noexcept nogil:
    """The general loop's work buffer: the input projection of every step (B, T, GH), the recurrent
    products (B, GH), rows of (B, H) and (B, P), then ``quant`` elements of int8's scratch. The one place
    it is laid out: RecurrentKernel's size check and run_direction both read it here."""
    cdef GeneralWork w
    w.xp = 0
    w.hp = w.xp + B * T * GH
    w.tmp = w.hp + B * GH
    w.hnew = w.tmp + B * H
    w.quant = w.hnew + B * P
    w.size = w.quant + quant
    return w


cdef void run_direction(Dims* d, int dirn, floating* x, floating* y, floating* h, floating* c,
                        const unsigned char* mask, floating* w_ih, floating* w_hh,
                        floating* w_hr, floating* bias, floating* bias_hn,
                        floating* work, const QW* qw, int threads) noexcept nogil:
    cdef int B = d.B, T = d.T, H = d.H, P = d.P, In = d.In
    cdef int GH = d.G * H
    cdef int ydim = d.D * P
    cdef Py_ssize_t xp_row = <Py_ssize_t>T * GH     # stride between batch rows in xp
    cdef Py_ssize_t y_row = <Py_ssize_t>T * ydim
    cdef GeneralWork w = general_work(B, T, GH, H, P, 0)
    cdef floating* xp = work + w.xp
    cdef floating* hp = work + w.hp
    cdef floating* tmp = work + w.tmp
    cdef floating* hnew = work + w.hnew
    cdef int s, t, b, j, step_back
    cdef floating* pre
    cdef floating* q
    cdef floating* hb
    cdef floating* cb
    cdef floating* yb
    cdef floating ig, fg, gg, og, r, z, n, cc
    cdef int act = d.act, gact = d.gate_act
    cdef bint reverse = (dirn == 1) != d.go_backwards
    cdef bint proj = w_hr != NULL
    cdef const le_gate_options* general = d.general
    if general != NULL:
        general += dirn
    # Quantized layers with sigmoid gates and tanh apply them with the float32 kernels' vector activations.
    cdef bint qgates = qw != NULL and qw.ih != NULL and act == ACT_TANH and gact == ACT_SIGMOID

    # Input projection of every timestep at once: xp[B*T, GH] = x[B*T, In] @ w_ih^T.
    cdef QW none
    if qw == NULL:
        none.ih = none.hh = none.hn = none.hr = NULL
        none.scratch = NULL
        qw = &none
    # A streamed step (T 1) of a quantized LSTM, RNN or GRU (reset after) runs its input and recurrent
    # products as one job (the same sums, one wake-up of the threads instead of two); skipped below.
    cdef bint paired = (floating is float and T == 1 and qw.ih != NULL and qw.hh != NULL and qw.hn == NULL
                        and (d.cell == CELL_LSTM or d.cell == CELL_RNN or d.cell == CELL_GRU))
    if paired:
        le_qgemm_pair(qw.ih, <float*>x, In, <float*>xp, GH, 0, qw.hh, <float*>h, P,
                      <float*>(xp if d.cell != CELL_GRU else hp), GH, d.cell != CELL_GRU, B, threads, qw.scratch)
    else:
        product(qw, qw.ih, B * T, GH, In, x, In, w_ih, In, 0, xp, GH, threads)
    step_back = 1 if reverse else -1

    for s in range(T):
        t = T - 1 - s if reverse else s
        pre = xp + <Py_ssize_t>t * GH

        if paired:
            pass
        elif d.cell == CELL_LSTM or d.cell == CELL_RNN:
            # Recurrent product accumulated straight into this step's projections.
            product(qw, qw.hh, B, GH, P, h, P, w_hh, P, 1, pre, <int>xp_row, threads)
        elif d.cell == CELL_GRU:
            product(qw, qw.hh, B, GH, P, h, P, w_hh, P, 0, hp, GH, threads)
        else:
            product(qw, qw.hh, B, 2 * H, P, h, P, w_hh, P, 0, hp, GH, threads)

        for b in range(B):
            yb = y + b * y_row + <Py_ssize_t>t * ydim + dirn * P
            if mask != NULL and not mask[<Py_ssize_t>b * T + t]:
                masked_output(yb, ydim, s, step_back, P, d.zero_masked)
                continue
            q = pre + b * xp_row
            hb = h + <Py_ssize_t>b * P
            if general != NULL:
                cb = c + <Py_ssize_t>b * H if d.cell == CELL_LSTM else hp + <Py_ssize_t>b * GH
                if d.cell == CELL_LSTM and proj:
                    hb = tmp + <Py_ssize_t>b * H
                general_row(general, d.cell, H, q, cb, bias, bias_hn, cb, hb, tmp + <Py_ssize_t>b * H)
                if d.cell != CELL_GRU_RESET_BEFORE and not proj:
                    memcpy(yb, hb, P * sizeof(floating))
            elif d.cell == CELL_LSTM:
                cb = c + <Py_ssize_t>b * H
                # Without a projection h is written in place: this step's product already read it.
                hb = tmp + <Py_ssize_t>b * H if proj else hb
                if floating is float:
                    if qgates:
                        le_q_lstm_gates(H, q, bias, cb, hb)
                        if not proj:
                            memcpy(yb, hb, P * sizeof(floating))
                        continue
                for j in range(H):
                    ig = activate(q[j] + bias[j], gact)
                    fg = activate(q[H + j] + bias[H + j], gact)
                    gg = activate(q[2 * H + j] + bias[2 * H + j], act)
                    og = activate(q[3 * H + j] + bias[3 * H + j], gact)
                    cc = fg * cb[j] + ig * gg
                    cb[j] = cc
                    hb[j] = og * activate(cc, act)
                if not proj:
                    memcpy(yb, hb, P * sizeof(floating))
            elif d.cell == CELL_RNN:
                for j in range(H):
                    hb[j] = activate(q[j] + bias[j], act)
                memcpy(yb, hb, P * sizeof(floating))
            elif d.cell == CELL_GRU:
                cb = hp + <Py_ssize_t>b * GH
                if floating is float:
                    if qgates:
                        le_q_gru_gates(H, q, cb, bias, bias_hn, hb)
                        memcpy(yb, hb, P * sizeof(floating))
                        continue
                for j in range(H):
                    r = activate(q[j] + cb[j] + bias[j], gact)
                    z = activate(q[H + j] + cb[H + j] + bias[H + j], gact)
                    n = activate(q[2 * H + j] + bias[2 * H + j]
                                 + r * (cb[2 * H + j] + bias_hn[j]), act)
                    hb[j] = (1 - z) * n + z * hb[j]
                memcpy(yb, hb, P * sizeof(floating))
            else:
                # Reset before the product: keep z, form r*h for the second product below.
                cb = hp + <Py_ssize_t>b * GH
                for j in range(H):
                    r = activate(q[j] + cb[j] + bias[j], gact)
                    cb[H + j] = activate(q[H + j] + cb[H + j] + bias[H + j], gact)
                    tmp[<Py_ssize_t>b * H + j] = r * hb[j]

        if d.cell == CELL_GRU_RESET_BEFORE:
            product(qw, qw.hn, B, H, H, tmp, H, w_hh + <Py_ssize_t>2 * H * H, H, 0, hp + 2 * H, GH, threads)
            for b in range(B):
                if mask != NULL and not mask[<Py_ssize_t>b * T + t]:
                    continue
                q = pre + b * xp_row
                cb = hp + <Py_ssize_t>b * GH
                hb = h + <Py_ssize_t>b * H
                if general != NULL:
                    if floating is float:
                        le_gru_before_output_f32(general, H, q, cb, bias, hb)
                    else:
                        le_gru_before_output_f64(general, H, q, cb, bias, hb)
                else:
                    for j in range(H):
                        n = activate(q[2 * H + j] + bias[2 * H + j] + cb[2 * H + j], act)
                        z = cb[H + j]
                        hb[j] = (1 - z) * n + z * hb[j]
                memcpy(y + b * y_row + <Py_ssize_t>t * ydim + dirn * P, hb, H * sizeof(floating))
        elif proj:
            product(qw, qw.hr, B, P, H, tmp, H, w_hr, H, 0, hnew, P, threads)
            for b in range(B):
                if mask != NULL and not mask[<Py_ssize_t>b * T + t]:
                    continue
                memcpy(h + <Py_ssize_t>b * P, hnew + <Py_ssize_t>b * P, P * sizeof(floating))
                memcpy(y + b * y_row + <Py_ssize_t>t * ydim + dirn * P, hnew + <Py_ssize_t>b * P,
                       P * sizeof(floating))


cdef inline void* data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline int panels(int H):
    return (H + LE_PANEL - 1) // LE_PANEL


cdef cnp.ndarray aligned_floats(Py_ssize_t n):
    """An uninitialised float32 array of n elements starting on a 64-byte boundary (a cache line)."""
    cdef cnp.npy_intp size = n + 16
    cdef cnp.ndarray buf = cnp.PyArray_EMPTY(1, &size, cnp.NPY_FLOAT32, 0)
    cdef Py_ssize_t skip = ((64 - <size_t>cnp.PyArray_DATA(buf) % 64) % 64) // 4
    return buf[skip:skip + n]


cdef int run_fast_direction(Dims* d, int dirn, float* x, float* y, float* h, float* c,
                            const unsigned char* mask, float* w_ih, float* w_hh, float* bias,
                            float* bias_hn, float* work, int threads, const float* table=NULL,
                            const Py_ssize_t* ids=NULL, const int* lengths=NULL,
                            const int* y_rows=NULL) noexcept nogil:
    """One direction of a float32 LSTM / GRU with sigmoid gates and tanh, in the C kernels (cpu_steps.c);
    returns the number of threads that ran it.

    Its own GEMM and GEMV on the weights packed once at load (OpenBLAS repacks the weights at every
    step), the gates applied to each tile of sums while it is in registers, and the units split
    across the engine's threads. No BLAS call at all: on a 2-core Xeon shared with other jobs, OpenBLAS's
    input projection (2 threads, whose workers then spin next to ours) cost 2.6x the engine's own on the
    sequence workload and 1.1x on batch (benches/RESULTS.md).
    """
    cdef le_steps_args a
    cdef Py_ssize_t step_bytes = <Py_ssize_t>d.G * d.H * d.H * sizeof(float) * d.B
    a.table = table
    a.ids = ids
    a.lengths = lengths
    a.y_rows = y_rows
    a.cell = d.cell  # CELL_LSTM or CELL_GRU: the only cells the fast path takes
    a.B = d.B
    a.In = d.In
    a.H = d.H
    a.T = d.T
    a.reverse = (dirn == 1) != d.go_backwards
    a.zero_masked = d.zero_masked
    a.x = x
    a.mask = mask
    a.y = y + dirn * d.P
    a.y_row = <Py_ssize_t>d.T * d.D * d.P
    a.y_step = d.D * d.P
    a.h = h
    a.c = c
    a.w_ih = w_ih
    a.w_hh = w_hh
    a.bias = bias
    a.bias_hn = bias_hn
    a.work = work
    return le_run_steps_f32(&a, threads_for(step_bytes, threads))


VARIANTS = tuple(le_simd_name(level).decode() for level in range(LE_NUM_VARIANTS))


def simd_level():
    """The float32 kernel variant in use: 0 portable, 1 AVX2+FMA, 2 AVX-512 (names in VARIANTS)."""
    return le_simd_level()


def _variant_number(level, names, what):
    """The number of a variant given by name or number (names[number]), -1 for None: dispatch chooses."""
    if level is None:
        return -1
    if isinstance(level, str):
        if level not in names:
            raise ValueError(f"unknown {what} {level!r}; expected one of {names}")
        return names.index(level)
    if not -1 <= level < len(names):
        raise ValueError(f"{what} must be -1 or 0..{len(names) - 1}, got {level}")
    return level


def set_simd_level(level):
    """Force a kernel variant by number or name (see VARIANTS), or let the CPU check choose (-1 or None).

    For tests and benchmarks. Raises ValueError for a variant this CPU cannot run, naming what it lacks."""
    level = _variant_number(level, VARIANTS, "kernel variant")
    if le_set_simd_level(level) != 0:
        raise ValueError(f"kernel variant {VARIANTS[level]!r} cannot run here: "
                         f"{le_simd_reason(level).decode()}")


def variant_supported(level):
    """(True, why) when this CPU runs the variant (number or name), else (False, what it lacks)."""
    if isinstance(level, str):
        level = VARIANTS.index(level)
    return level <= le_simd_detected(), le_simd_reason(level).decode()


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def cpu_info():
    """Which float32 kernel variant runs and why, what each variant needs, and the default threads.

    A dict: cpu (model name), variant, reason, variants {name: {supported, reason}}, threads,
    threads_reason, pool (what the worker pool did: pool_stats()). LSTM_ENGINE_KERNELS=portable|avx2|avx512
    in the environment forces a variant."""
    level = le_simd_level()
    forced = le_simd_forced() >= 0
    return {
        "cpu": _cpu_model(),
        "variant": VARIANTS[level],
        "reason": ("forced (LSTM_ENGINE_KERNELS or set_simd_level); " if forced else "the best this CPU runs: ")
                  + le_simd_reason(level).decode(),
        "variants": {VARIANTS[v]: {"supported": v <= le_simd_detected(),
                                   "reason": le_simd_reason(v).decode()} for v in range(LE_NUM_VARIANTS)},
        "threads": le_cpu_count(),
        "threads_reason": le_cpu_count_reason().decode(),
        "pool": pool_stats(),
        # The products of quantized models (lstm_engine.quantize); LSTM_ENGINE_KERNELS caps them too.
        "quantized_variant": QUANT_VARIANTS[le_q_level()],
        "quantized_variants": {QUANT_VARIANTS[v]: {"supported": bool(le_q_supported(v)),
                                                   "reason": le_q_reason(v).decode()}
                               for v in range(LE_Q_NUM_VARIANTS)},
    }


def _force_from_environment():
    import os

    name = os.environ.get("LSTM_ENGINE_KERNELS", "").strip()
    if name:
        try:
            set_simd_level(name)
        except ValueError as e:
            raise ValueError(f"LSTM_ENGINE_KERNELS={name!r}: {e}") from None


_force_from_environment()


def cpu_count():
    """Cores this process may run on (its affinity mask)."""
    return le_cpu_count()


POOL_STATS = ("asked", "split", "one_core", "stalled", "contended", "busy", "away")


def pool_stats():
    """What the worker pool did with the jobs that asked for more than one thread, since the process began.

    asked: such jobs; split: those that ran on more than one thread; the others ran on the caller's thread
    alone, counted by the first reason found: one_core (the process may use one core now: its affinity mask
    or cgroup quota, read again every 100 ms), stalled (a thread of a recent job waited long for another that
    had lost its core: one thread for 1 ms, doubling to 1 s while stalls repeat), contended (other processes,
    sampled from /proc/stat every 100 ms at most, leave this one a single core: short jobs stay on one thread),
    busy (another call has the workers), away (a short job and no worker spinning on a core: they are woken
    for the next one). Also cores (the usable cores the pool last read, 0 before its first job) and
    contended_now."""
    cdef long out[LE_POOL_NSTATS]
    cdef int cores, contended
    le_pool_stats(out, &cores, &contended)
    stats = {name: out[i] for i, name in enumerate(POOL_STATS)}
    stats["cores"] = cores
    stats["contended_now"] = bool(contended)
    return stats


def _contention(double others, int cores=2, long until=0):
    """For tests: record that other processes used `others` cores of `cores` (others < 0: forget every sample;
    the next sample only starts), and take no real sample before `until` (time.monotonic_ns()). Returns
    (contended now, the whole cores the others leave; 0: unknown)."""
    cdef int left
    contended = le_pool_contention(until, others, cores, &left)
    return bool(contended), left


def _pool_join_delay(long ns):
    """For tests: the pool's workers wait ns before joining each job (0: at once), as workers without a core."""
    le_pool_set_join_delay(ns)


def blas_threads():
    """The thread count of the OpenBLAS builds in this process (the largest), 0 if none was found."""
    return le_blas_threads()


def set_blas_threads(int n):
    """Set every OpenBLAS build's thread count in this process (process-wide: OpenBLAS has no other kind)."""
    le_blas_set_threads(n)


cdef Py_ssize_t row_bytes(cnp.ndarray a, cnp.ndarray b, str what) except -1:
    """The bytes of a row of 2-D C-contiguous a and b, which must agree in dtype and width."""
    if (cnp.PyArray_NDIM(a) != 2 or cnp.PyArray_NDIM(b) != 2 or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or not cnp.PyArray_IS_C_CONTIGUOUS(b) or cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(b)
            or a.shape[1] != b.shape[1] or not cnp.PyArray_ISWRITEABLE(b)):
        raise ValueError(f"{what}: expected 2-D C-contiguous arrays of one dtype and width, the target writeable")
    return a.shape[1] * cnp.PyArray_ITEMSIZE(a)


cdef const Py_ssize_t* checked_rows(cnp.ndarray idx, Py_ssize_t n, Py_ssize_t rows, str what) except NULL:
    """idx's data: a C-contiguous 1-D intp array of n row numbers in [0, rows)."""
    cdef Py_ssize_t i
    cdef const Py_ssize_t* p
    if cnp.PyArray_TYPE(idx) != cnp.NPY_INTP or cnp.PyArray_NDIM(idx) != 1 or not cnp.PyArray_IS_C_CONTIGUOUS(idx):
        raise ValueError(f"{what}: idx must be a C-contiguous 1-D intp array")
    p = <const Py_ssize_t*>cnp.PyArray_DATA(idx)
    for i in range(n):
        if p[i] < 0 or p[i] >= rows:
            raise ValueError(f"{what}: row {p[i]} out of range [0, {rows})")
    return p


cdef move_rows(cnp.ndarray src, cnp.ndarray idx, cnp.ndarray dst, bint put):
    """take: dst[:len(idx)] = src[idx]; put: dst[idx] = src[:len(idx)]."""
    what = "put_rows" if put else "take_rows"
    cdef Py_ssize_t i, n = idx.shape[0], size = row_bytes(src, dst, what)
    cdef const Py_ssize_t* p = checked_rows(idx, n, (dst if put else src).shape[0], what)
    cdef const char* s = <const char*>cnp.PyArray_DATA(src)
    cdef char* d = <char*>cnp.PyArray_DATA(dst)
    if n > (src if put else dst).shape[0]:
        raise ValueError(f"{what}: {n} rows, the packed side has {(src if put else dst).shape[0]}")
    with nogil:
        for i in range(n):
            if put:
                memcpy(d + p[i] * size, s + i * size, size)
            else:
                memcpy(d + i * size, s + p[i] * size, size)


def take_rows(cnp.ndarray src, cnp.ndarray idx, cnp.ndarray dst):
    """dst[:len(idx)] = src[idx] for 2-D C-contiguous arrays of one dtype and width: the pool's gather of its
    streams' states (np.take with out= costs a few microseconds a call, most of it before the copy)."""
    move_rows(src, idx, dst, False)


def put_rows(cnp.ndarray src, cnp.ndarray idx, cnp.ndarray dst):
    """dst[idx] = src[:len(idx)]: take_rows' scatter back."""
    move_rows(src, idx, dst, True)


def stack_rows(list xs, cnp.ndarray dst):
    """dst[i] = xs[i] for 1-D C-contiguous arrays of dst's dtype and width (the pool's inputs, each a
    stream's step); False, with nothing written, when any of them is not such an array (then the caller
    stacks them with NumPy)."""
    cdef Py_ssize_t i, n = len(xs), width
    cdef Py_ssize_t size
    cdef cnp.ndarray a
    cdef char* d
    if (cnp.PyArray_NDIM(dst) != 2 or not cnp.PyArray_IS_C_CONTIGUOUS(dst) or not cnp.PyArray_ISWRITEABLE(dst)
            or n > dst.shape[0]):
        raise ValueError("stack_rows: dst must be a writeable 2-D C-contiguous array of at least len(xs) rows")
    width = dst.shape[1]
    for x in xs:
        if type(x) is not np.ndarray:
            return False
        a = <cnp.ndarray>x
        if (cnp.PyArray_TYPE(a) != cnp.PyArray_TYPE(dst) or cnp.PyArray_NDIM(a) != 1 or a.shape[0] != width
                or not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_ISBEHAVED_RO(a)):
            return False
    size = width * cnp.PyArray_ITEMSIZE(dst)
    d = <char*>cnp.PyArray_DATA(dst)
    for i in range(n):
        memcpy(d + i * size, cnp.PyArray_DATA(<cnp.ndarray>xs[i]), size)
    return True


def set_parallel_min_bytes(Py_ssize_t n):
    """Weights read per step (times the batch) below which a run stays on one thread; returns the old value.

    For benchmarks and tests."""
    global parallel_min_bytes
    old, parallel_min_bytes = parallel_min_bytes, n
    return old



def dense_row(cnp.ndarray weight, cnp.ndarray x, object bias, cnp.ndarray out, int threads=1):
    """out = weight @ x (+ bias) for one float32 row, with the engine's own GEMV on up to ``threads``
    of its threads (one under contention, or when the weight is small).

    weight (N, K), x (K,), bias (N,) or None, out (N,): float32, C-contiguous (the caller checks;
    a mismatch raises ValueError here rather than reading out of bounds). A batch-1 Dense head
    (10000 x 512) through a 2-thread BLAS call is slower on a busy machine: its second thread
    waits for a core (benches/RESULTS.md); the engine's threads do not wait for one."""
    cdef int N, K
    cdef const float* b = NULL
    if (cnp.PyArray_NDIM(weight) != 2 or cnp.PyArray_TYPE(weight) != cnp.NPY_FLOAT32
            or not cnp.PyArray_IS_C_CONTIGUOUS(weight)):
        raise ValueError("dense_row: weight must be a C-contiguous float32 (N, K) array")
    N = weight.shape[0]
    K = weight.shape[1]
    for a, n in ((x, K), (out, N)) + (() if bias is None else ((bias, N),)):
        if (cnp.PyArray_TYPE(<cnp.ndarray>a) != cnp.NPY_FLOAT32 or cnp.PyArray_SIZE(<cnp.ndarray>a) != n
                or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>a)):
            raise ValueError(f"dense_row: expected C-contiguous float32 arrays of {K} (x) and {N} (bias, out) "
                             "elements")
    if bias is not None:
        b = <const float*>cnp.PyArray_DATA(<cnp.ndarray>bias)
    threads = threads_for(<Py_ssize_t>N * K * <Py_ssize_t>sizeof(float), threads)
    with nogil:
        le_gemv_f32(N, K, <const float*>cnp.PyArray_DATA(weight), K, <const float*>cnp.PyArray_DATA(x), b,
                    <float*>cnp.PyArray_DATA(out), threads)
    return out


cdef Py_ssize_t float_stride(cnp.ndarray a, int axis, str name) except -1:
    """An axis's stride in floats (0 for an axis of one, whose stride NumPy may leave arbitrary); ValueError
    unless a whole, non-negative number of them."""
    if a.shape[axis] <= 1:
        return 0
    cdef Py_ssize_t st = cnp.PyArray_STRIDE(a, axis)
    if st < 0 or st % 4:
        raise ValueError(f"Conv1d: {name} must have non-negative strides of whole floats")
    return st // 4


def magnitude(cnp.ndarray a, cnp.ndarray b):
    """sqrt(a*a + b*b) elementwise for float32 a and b of one shape (C-contiguous): an STFT's magnitude from its
    real and imaginary halves in one call, instead of NumPy's Pow, Pow, Add and Sqrt on a streamed chunk's few
    hundred values. Each square, the sum and the square root rounded once, as NumPy's power(x, 2) (x*x exactly),
    add and sqrt round them: the same bits (le_magnitude_f32)."""
    if cnp.PyArray_TYPE(a) != cnp.NPY_FLOAT32 or cnp.PyArray_TYPE(b) != cnp.NPY_FLOAT32 \
            or not cnp.PyArray_IS_C_CONTIGUOUS(a) or not cnp.PyArray_IS_C_CONTIGUOUS(b) \
            or (<object>a).shape != (<object>b).shape:
        raise ValueError("magnitude: a and b must be C-contiguous float32 arrays of one shape")
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(a.ndim, a.shape, cnp.NPY_FLOAT32, 0)
    with nogil:
        le_magnitude_f32(cnp.PyArray_SIZE(a), <const float*>cnp.PyArray_DATA(a), <const float*>cnp.PyArray_DATA(b),
                         <float*>cnp.PyArray_DATA(out))
    return out


cdef class Conv1d:
    """ONNX Conv 1-D of one group, float32, on this thread, its weight checked once:
    y[n, m, l] = bias[m] + sum over c, j of weight[m, c*k + j] * x[n, c, l*stride + j*dilation - pad0],
    then max(y, 0) if relu. Outside x the input is 0 (the Conv's pads), or with ``reflect`` mirrored as an ONNX
    reflect Pad of (pad0, pad1) along L makes it: the Pad folded into the window gather, no padded copy.

    weight (M, C*k) and bias (M,) or None: float32, C-contiguous, kept. ``conv(x, out=None)``: x (N, C, L) float32
    with unit stride along L (a group's channel slice is fine) -> out (N, M, Lo), Lo = (L + pad0 + pad1 -
    dilation*(k-1) - 1) // stride + 1, made here or given (unit stride along Lo). One object serves every call of a
    specialised plan's Conv step, so a call checks only what its input can change (a streamed chunk's convolutions
    are a few microseconds of arithmetic: the checks of a fresh call were a third of the smallest ones)."""
    cdef le_conv1d_args a
    cdef readonly object weight, bias
    cdef object packed
    cdef int pad1

    def __init__(self, cnp.ndarray weight, object bias, int k, int stride=1, int dilation=1, int pad0=0,
                 int pad1=0, bint relu=False, bint reflect=False):
        if cnp.PyArray_TYPE(weight) != cnp.NPY_FLOAT32 or weight.ndim != 2 \
                or not cnp.PyArray_IS_C_CONTIGUOUS(weight):
            raise ValueError("Conv1d: weight must be a C-contiguous float32 (M, C*k) array")
        if k < 1 or stride < 1 or dilation < 1 or pad0 < 0 or pad1 < 0 or weight.shape[1] % k \
                or weight.shape[0] < 1 or weight.shape[1] < 1:
            raise ValueError(f"Conv1d: weight {tuple((<object>weight).shape)} does not fit k={k}, stride={stride}, "
                             f"dilation={dilation}, pads=({pad0}, {pad1})")
        memset(&self.a, 0, sizeof(le_conv1d_args))
        self.a.M = weight.shape[0]
        self.a.C = weight.shape[1] // k
        if bias is not None:
            if cnp.PyArray_TYPE(<cnp.ndarray>bias) != cnp.NPY_FLOAT32 or (<cnp.ndarray>bias).ndim != 1 \
                    or bias.shape[0] != self.a.M or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>bias):
                raise ValueError(f"Conv1d: bias must be a C-contiguous float32 ({self.a.M},) array")
            self.a.b = <const float*>cnp.PyArray_DATA(<cnp.ndarray>bias)
        self.weight, self.bias = weight, bias
        self.a.W = <const float*>cnp.PyArray_DATA(weight)
        # Packed once for the AVX2 and AVX-512 products (the portable one, which any call may force, reads weight).
        self.packed = np.empty(le_conv1d_packed_size(self.a.M, weight.shape[1]), np.float32)
        le_conv1d_pack(self.a.M, weight.shape[1], self.a.W, <float*>cnp.PyArray_DATA(<cnp.ndarray>self.packed))
        self.a.Wp = <const float*>cnp.PyArray_DATA(<cnp.ndarray>self.packed)
        self.a.k, self.a.stride, self.a.dilation, self.a.pad0, self.a.relu = k, stride, dilation, pad0, relu
        self.a.reflect = reflect
        self.pad1 = pad1

    def __call__(self, cnp.ndarray x, cnp.ndarray out=None):
        cdef le_conv1d_args a = self.a
        cdef cnp.npy_intp dims[3]
        cdef int span = a.dilation * (a.k - 1) + 1
        cdef int rc
        if cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT32 or x.ndim != 3 or x.shape[1] != a.C:
            raise ValueError(f"Conv1d: x must be float32 (N, {a.C}, L), got {x.dtype} {tuple((<object>x).shape)}")
        a.N, a.L = x.shape[0], x.shape[2]
        if a.reflect and (a.pad0 >= a.L or self.pad1 >= a.L):
            raise ValueError(f"Conv1d: a reflect pad of ({a.pad0}, {self.pad1}) needs more than that many steps, "
                             f"got {a.L}")
        if a.L + a.pad0 + self.pad1 < span:
            raise ValueError(f"Conv1d: the input of length {a.L} is shorter than the kernel's span {span}")
        a.Lo = (a.L + a.pad0 + self.pad1 - span) // a.stride + 1
        if a.L > 1 and x.strides[2] != 4:
            raise ValueError("Conv1d: x must have unit stride along its last axis")
        if out is None:
            dims[0], dims[1], dims[2] = a.N, a.M, a.Lo
            out = cnp.PyArray_EMPTY(3, dims, cnp.NPY_FLOAT32, 0)
        elif cnp.PyArray_TYPE(out) != cnp.NPY_FLOAT32 or out.ndim != 3 or out.shape[0] != a.N \
                or out.shape[1] != a.M or out.shape[2] != a.Lo or (a.Lo > 1 and out.strides[2] != 4):
            raise ValueError(f"Conv1d: out must be float32 ({a.N}, {a.M}, {a.Lo}) with unit stride along its "
                             f"last axis")
        a.x_n, a.x_c = float_stride(x, 0, "x"), float_stride(x, 1, "x")
        a.y_n, a.y_m = float_stride(out, 0, "out"), float_stride(out, 1, "out")
        a.x = <const float*>cnp.PyArray_DATA(x)
        a.y = <float*>cnp.PyArray_DATA(out)
        a.cols = NULL
        with nogil:
            rc = le_conv1d_f32(&a)
        if rc:
            raise MemoryError("Conv1d: no memory for the window columns")
        return out


def fast_tanh(cnp.ndarray[float, ndim=1, mode="c"] x):
    """The float32 kernels' tanh of a 1-D float32 array (a new array); for tests."""
    out = cnp.PyArray_EMPTY(1, x.shape, cnp.NPY_FLOAT32, 0)
    le_tanh_f32(&x[0] if x.shape[0] else NULL, <float*>cnp.PyArray_DATA(out), x.shape[0])
    return out


def fast_sigmoid(cnp.ndarray[float, ndim=1, mode="c"] x):
    """The float32 kernels' sigmoid, tanh(x/2)/2 + 1/2, of a 1-D float32 array (a new array); for tests."""
    out = cnp.PyArray_EMPTY(1, x.shape, cnp.NPY_FLOAT32, 0)
    le_sigmoid_f32(&x[0] if x.shape[0] else NULL, <float*>cnp.PyArray_DATA(out), x.shape[0])
    return out


cdef set_activation(le_activation* a, tuple spec):
    code, alpha, beta = spec
    if not 0 <= code < ACT_COUNT:
        raise ValueError(f"RecurrentKernel: activation code {code} is not one of 0..{ACT_COUNT - 1}")
    a.code = code
    a.alpha = alpha
    a.beta = beta


cdef set_options(le_gate_options* o, dict spec, object dtype, int H):
    set_activation(&o.gate, spec["gate"])
    set_activation(&o.act, spec["act"])
    set_activation(&o.cell_act, spec["cell_act"])
    o.clip = spec["clip"]
    o.input_forget = spec["input_forget"]
    p = spec["peephole"]
    if p is not None and (not isinstance(p, cnp.ndarray) or p.dtype != dtype or p.size != 3 * H
                          or not p.flags.c_contiguous):
        raise ValueError(f"RecurrentKernel: peephole must be a C-contiguous {dtype} array of 3*{H} values")
    o.peephole = data_or_null(p)


# {cell name: code} for the Python layers (lstm.py, gru.py, rnn.py), from _cells.h (the one definition).
CELL_CODES = {"LSTM": CELL_LSTM, "GRU": CELL_GRU, "GRU_RESET_BEFORE": CELL_GRU_RESET_BEFORE, "RNN": CELL_RNN}


def activation_codes():
    """{name: code} of every activation the kernels know, from _activations.h (the one list)."""
    return {le_activation_name(k).decode(): k for k in range(ACT_COUNT)}


def general_activation(int code, double alpha, double beta, cnp.ndarray[double, ndim=1, mode="c"] x):
    """The general gate loop's activation of a 1-D float64 array (a new array); for tests."""
    cdef le_activation a
    cdef Py_ssize_t k
    set_activation(&a, (code, alpha, beta))
    out = cnp.PyArray_EMPTY(1, x.shape, cnp.NPY_FLOAT64, 0)
    cdef double[::1] o = out
    for k in range(x.shape[0]):
        o[k] = le_activate_f64(&a, x[k])
    return out


cdef Py_ssize_t check_table(object table, int D, int G, int H, cnp.ndarray ids) except -1:
    """Check an input table (D, V, G*Hp) and that every id of ids indexes it; the floats per direction."""
    cdef cnp.ndarray t = <cnp.ndarray?>table
    cdef Py_ssize_t V, i, n = cnp.PyArray_SIZE(ids)
    cdef const Py_ssize_t* p = <const Py_ssize_t*>cnp.PyArray_DATA(ids)
    if (cnp.PyArray_NDIM(t) != 3 or cnp.PyArray_TYPE(t) != cnp.NPY_FLOAT32 or not cnp.PyArray_IS_C_CONTIGUOUS(t)
            or t.shape[0] != D or t.shape[2] != G * panels(H) * LE_PANEL):
        raise ValueError("RecurrentKernel.run: the table does not match the layer")
    V = t.shape[1]
    if not cnp.PyArray_IS_C_CONTIGUOUS(ids):
        raise ValueError("RecurrentKernel.run: ids must be C-contiguous")
    for i in range(n):
        if p[i] < 0 or p[i] >= V:
            raise ValueError(f"RecurrentKernel.run: token id {p[i]} is outside the table's {V} rows")
    return V * t.shape[2]


cdef const int* check_rows(object values, int B, int top, bint descending) except NULL:
    """An int32 (B,) array of values in 0..top (non-increasing when descending); its data."""
    cdef cnp.ndarray a = <cnp.ndarray?>values
    cdef const int* p
    cdef int i
    if cnp.PyArray_TYPE(a) != cnp.NPY_INT32 or cnp.PyArray_NDIM(a) != 1 or a.shape[0] != B \
            or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"RecurrentKernel.run: lengths and y_rows must be int32 ({B},)")
    p = <const int*>cnp.PyArray_DATA(a)
    for i in range(B):
        if p[i] < 0 or p[i] > top or (descending and i > 0 and p[i] > p[i - 1]):
            raise ValueError("RecurrentKernel.run: lengths must be in 0..steps, longest first; y_rows in 0..batch-1")
    return p if B > 0 else <const int*>&one_inc


cdef class RecurrentKernel:
    """One recurrent layer (every direction) in one dtype, bound to its re-laid-out weights.

    Weights per direction d: w_ih[d] (G*H, I), w_hh[d] (G*H, P), w_hr[d] (P, H) or None,
    bias[d] (G*H) with the input and recurrent biases summed where the equations allow,
    bias_hn[d] (H) (GRU only: the recurrent n bias, which stays inside the reset product).
    All C-contiguous, of one dtype; the Python layer builds them once. go_backwards runs the
    single direction from the last step to the first (Keras), writing each output at its own step.
    ``options``: None, or per direction a dict for the general gate loop (_gates_general.c):
    ``gate``, ``act``, ``cell_act`` as (code, alpha, beta), ``clip`` (0: none), ``input_forget``,
    ``peephole`` ((3, H) rows i, f, o, or None). ``threads`` is how many threads a run may use
    (default: every core of the process); a run also takes its own.
    """
    cdef readonly int cell, num_directions, input_size, hidden_size, output_size, num_gates
    cdef readonly int act, gate_act
    cdef readonly bint is_double, go_backwards
    cdef readonly object dtype
    cdef public int threads
    cdef int typenum
    cdef readonly bint fast  # float32 LSTM without projection / GRU (reset after), sigmoid gates, tanh: the C kernels
    cdef readonly str weight_format  # "float32"/"float64", or a quantized format ("int8", ...)
    cdef QW q[2]
    cdef bint quantized
    cdef tuple _keep
    cdef tuple _packed  # the fast path's panels, which w_ih etc. point into then
    cdef void* w_ih[2]
    cdef void* w_hh[2]
    cdef void* w_hr[2]
    cdef void* bias[2]
    cdef void* bias_hn[2]
    cdef le_gate_options general[2]
    cdef readonly bint is_general  # runs the general gate loop (options given)

    def __init__(self, int cell, int act, int gate_act, list w_ih, list w_hh, list w_hr,
                 list bias, list bias_hn, bint go_backwards=False, list options=None, list quant=None):
        """options: per direction the general gate loop's options (or None for the plain loops).
        quant: per direction a dict of PackedWeight "ih", "hh", "hn" (GRU reset before), "hr" (or None)
        for a float32 kernel whose products run on quantized weights; w_ih etc. then give the sizes."""
        cdef int d
        self.cell = cell
        self.go_backwards = go_backwards
        self.act = act
        self.gate_act = gate_act
        self.num_directions = len(w_ih)
        self.num_gates = 4 if cell == CELL_LSTM else (1 if cell == CELL_RNN else 3)
        self.hidden_size = w_ih[0].shape[0] // self.num_gates
        self.input_size = w_ih[0].shape[1]
        self.output_size = w_hh[0].shape[1]
        self.dtype = w_ih[0].dtype
        self.typenum = self.dtype.num
        self.is_double = self.dtype.itemsize == 8
        self.threads = le_cpu_count()
        self._keep = (w_ih, w_hh, w_hr, bias, bias_hn, options)
        self.is_general = options is not None
        if self.is_general:
            if len(options) != self.num_directions:
                raise ValueError("RecurrentKernel: options must have one entry per direction")
            for d in range(self.num_directions):
                set_options(&self.general[d], options[d], self.dtype, self.hidden_size)
        for d in range(self.num_directions):
            self.w_ih[d] = data_or_null(w_ih[d])
            self.w_hh[d] = data_or_null(w_hh[d])
            self.w_hr[d] = data_or_null(w_hr[d])
            self.bias[d] = data_or_null(bias[d])
            self.bias_hn[d] = data_or_null(bias_hn[d])
        self.weight_format = str(self.dtype)
        self.quantized = quant is not None
        if self.quantized:
            if self.is_double or len(quant) != self.num_directions:
                raise ValueError("RecurrentKernel: quantized weights need float32 and one entry per direction")
            self._keep = self._keep + (quant,)
            for d in range(self.num_directions):
                self.q[d].ih = _qmat(quant[d].get("ih"))
                self.q[d].hh = _qmat(quant[d].get("hh"))
                self.q[d].hn = _qmat(quant[d].get("hn"))
                self.q[d].hr = _qmat(quant[d].get("hr"))
                self.weight_format = quant[d]["ih"].kind
        self.fast = (not self.is_general and not self.is_double and not self.quantized and act == ACT_TANH and gate_act == ACT_SIGMOID
                       and ((cell == CELL_LSTM and w_hr[0] is None) or cell == CELL_GRU))
        if self.fast:
            self._pack(w_ih, w_hh, bias, bias_hn)

    def _pack(self, list w_ih, list w_hh, list bias, list bias_hn):
        """Lay the float32 weights out once in the C kernels' panels (cpu_steps.c: one layout for every variant)."""
        cdef int d, G = self.num_gates, H = self.hidden_size, In = self.input_size
        cdef cnp.ndarray src, out
        packed = []
        for d in range(self.num_directions):
            p_ih = aligned_floats(le_packed_size(G, H, In))
            p_hh = aligned_floats(le_packed_size(G, H, H))
            p_bias = aligned_floats(G * panels(H) * LE_PANEL)
            for src, out, K in ((w_ih[d], p_ih, In), (w_hh[d], p_hh, H)):
                le_pack_f32(<float*>cnp.PyArray_DATA(src), G, H, K, <float*>cnp.PyArray_DATA(out))
            src = bias[d]
            le_pack_bias_f32(<float*>cnp.PyArray_DATA(src), G, H, <float*>cnp.PyArray_DATA(p_bias))
            p_bhn = None
            if bias_hn[d] is not None:
                p_bhn = aligned_floats(panels(H) * LE_PANEL)
                p_bhn[:] = 0
                p_bhn[:H] = bias_hn[d]
            self.w_ih[d] = cnp.PyArray_DATA(p_ih)
            self.w_hh[d] = cnp.PyArray_DATA(p_hh)
            self.bias[d] = cnp.PyArray_DATA(p_bias)
            self.bias_hn[d] = data_or_null(p_bhn)
            packed.append((p_ih, p_hh, p_bias, p_bhn))
        self._packed = tuple(packed)
        self._keep = ()  # the fast path reads only the packed copies

    @property
    def packed(self):
        """Per direction (w_ih, w_hh) in the C kernels' panels, float32 (P, K, G, 16), or None off the fast path."""
        if not self.fast:
            return None
        P = panels(self.hidden_size)
        return tuple((p[0].reshape(P, self.input_size, self.num_gates, LE_PANEL),
                      p[1].reshape(P, self.hidden_size, self.num_gates, LE_PANEL)) for p in self._packed)

    cdef inline Py_ssize_t _work_size(self, Py_ssize_t batch, Py_ssize_t steps):
        if self.fast:
            return le_steps_work_size(self.cell, batch, self.hidden_size, steps)
        return general_work(batch, steps, <Py_ssize_t>self.num_gates * self.hidden_size, self.hidden_size,
                            self.output_size, self._quant_scratch(batch, steps)).size

    cdef inline Py_ssize_t _quant_scratch(self, Py_ssize_t batch, Py_ssize_t steps):
        """Elements of work (of this kernel's dtype) for le_qgemm's scratch, twice over (le_qgemm_pair):
        0 unless int8."""
        if self.weight_format != "int8":
            return 0
        cdef int K = max(self.input_size, self.hidden_size, self.output_size)
        return (2 * le_qgemm_scratch(<int>(batch * steps), K) + 3) // 4

    def work_size(self, int batch, int steps):
        """Elements of scratch one run over (batch, steps) needs."""
        return self._work_size(batch, steps)

    def input_table(self, cnp.ndarray rows):
        """The input projection W_ih . x + bias of every row of rows (V, I) float32, per direction, in the
        C kernels' packed order: (D, V, G*Hp), what ``run(table=)`` looks a token's row up in. Computed
        by the same product as a run's own projection, so a run with the table equals one without."""
        cdef int d, V
        cdef int Hp = panels(self.hidden_size) * LE_PANEL
        if not self.fast:
            raise ValueError("RecurrentKernel.input_table: only the C kernels (float32 LSTM/GRU) take a table")
        if (cnp.PyArray_NDIM(rows) != 2 or cnp.PyArray_TYPE(rows) != cnp.NPY_FLOAT32
                or rows.shape[1] != self.input_size or not cnp.PyArray_IS_C_CONTIGUOUS(rows)):
            raise ValueError(f"RecurrentKernel.input_table: expected C-contiguous float32 (V, {self.input_size})")
        V = rows.shape[0]
        out = aligned_floats(<Py_ssize_t>self.num_directions * V * self.num_gates * Hp).reshape(
            self.num_directions, V, self.num_gates * Hp)
        cdef cnp.ndarray o = out
        cdef float* od = <float*>cnp.PyArray_DATA(o)
        with nogil:
            for d in range(self.num_directions):
                le_project_f32(self.cell, self.hidden_size, self.input_size,
                               <const float*>cnp.PyArray_DATA(rows), V, <const float*>self.w_ih[d],
                               <const float*>self.bias[d], od + <Py_ssize_t>d * V * self.num_gates * Hp)
        return out

    def run(self, cnp.ndarray x, cnp.ndarray y, cnp.ndarray h, cnp.ndarray c, object mask,
            cnp.ndarray work, bint zero_masked, int threads=0, object table=None, object lengths=None,
            object y_rows=None):
        """Run every direction over x (B, T, I) into y (B, T, D*P).

        h (D, B, P) and c (D, B, H) hold the initial state and receive the final one. mask is a
        uint8 (B, T) array or None; masked steps keep the state and output zeros (zero_masked)
        or the previous step's output. threads > 0 overrides the kernel's ``threads``.
        The C kernels (``fast``) also take: table, the input projection of every token id made by
        ``input_table`` ((D, V, G*Hp) float32), with x then the ids (B, T) as intp; lengths, int32
        (B,) valid steps per row, longest first (rows past their length cost nothing, keep their
        state and output zeros; mask must be None); y_rows, int32 (B,): the row of y each row
        writes (rows sorted for lengths, outputs in the caller's order).
        Returns the number of threads the step loop ran on: those the C kernels split the units across on
        the float32 fast path (the most of any direction); 1 for the general loop, which runs on the calling
        thread (its BLAS or quantized products may use up to ``threads``); 0 for an empty input.
        """
        cdef Dims dims
        cdef int dirn
        cdef const unsigned char* m = <const unsigned char*>data_or_null(mask)
        cdef char* xd = <char*>cnp.PyArray_DATA(x)
        cdef char* yd = <char*>cnp.PyArray_DATA(y)
        cdef char* hd = <char*>cnp.PyArray_DATA(h)
        cdef char* cd = <char*>cnp.PyArray_DATA(c)
        cdef char* wd = <char*>cnp.PyArray_DATA(work)
        cdef Py_ssize_t hstride, cstride
        cdef int tn = self.typenum
        cdef bint fast = self.fast
        cdef int blas_saved = 0
        cdef const float* tab = NULL
        cdef const Py_ssize_t* ids = NULL
        cdef const int* lens = NULL
        cdef const int* rows = NULL
        cdef Py_ssize_t table_step = 0
        cdef int used = 1, ran
        if threads <= 0:
            threads = self.threads
        dims.cell = self.cell
        dims.D = self.num_directions
        dims.In = self.input_size
        dims.H = self.hidden_size
        dims.P = self.output_size
        dims.G = self.num_gates
        dims.act = self.act
        dims.gate_act = self.gate_act
        dims.zero_masked = zero_masked
        dims.go_backwards = self.go_backwards
        dims.general = &self.general[0] if self.is_general else NULL
        # Cheap guards against a caller bug turning into an out-of-bounds write (C-level checks:
        # this runs once per streamed step).
        if table is not None:
            if not fast or cnp.PyArray_NDIM(x) != 2 or cnp.PyArray_TYPE(x) != cnp.NPY_INTP:
                raise ValueError("RecurrentKernel.run: a table needs the C kernels and ids (B, T) as intp")
            table_step = check_table(table, self.num_directions, self.num_gates, self.hidden_size, x)
            tab = <const float*>cnp.PyArray_DATA(<cnp.ndarray>table)
            ids = <const Py_ssize_t*>cnp.PyArray_DATA(x)
        elif cnp.PyArray_NDIM(x) != 3 or x.shape[2] != dims.In or cnp.PyArray_TYPE(x) != tn:
            raise ValueError("RecurrentKernel.run: x does not match the layer")
        dims.B = x.shape[0]
        dims.T = x.shape[1]
        if (cnp.PyArray_SIZE(y) != <Py_ssize_t>dims.B * dims.T * dims.D * dims.P
                or cnp.PyArray_TYPE(y) != tn
                or cnp.PyArray_SIZE(h) != <Py_ssize_t>dims.D * dims.B * dims.P or cnp.PyArray_TYPE(h) != tn
                or cnp.PyArray_SIZE(work) < self._work_size(dims.B, dims.T) or cnp.PyArray_TYPE(work) != tn
                or (self.cell == CELL_LSTM and (cnp.PyArray_SIZE(c) != <Py_ssize_t>dims.D * dims.B * dims.H
                                                or cnp.PyArray_TYPE(c) != tn))
                or (mask is not None and cnp.PyArray_SIZE(<cnp.ndarray>mask) != <Py_ssize_t>dims.B * dims.T)
                or not (cnp.PyArray_IS_C_CONTIGUOUS(x) and cnp.PyArray_IS_C_CONTIGUOUS(y)
                        and cnp.PyArray_IS_C_CONTIGUOUS(h) and cnp.PyArray_IS_C_CONTIGUOUS(c)
                        and cnp.PyArray_IS_C_CONTIGUOUS(work))):
            raise ValueError("RecurrentKernel.run: buffers do not match the layer")
        if lengths is not None or y_rows is not None:
            if not fast or mask is not None or lengths is None:
                raise ValueError("RecurrentKernel.run: lengths need the C kernels, and no mask")
            lens = check_rows(lengths, dims.B, dims.T, True)
            if y_rows is not None:
                rows = check_rows(y_rows, dims.B, dims.B - 1, False)
        if dims.B == 0 or dims.T == 0:
            return 0
        if not fast and not self.quantized:
            if sgemm == NULL:
                load_blas()
            # BLAS runs in this call: hold it to this call's threads, restored after.
            blas_saved = le_blas_threads()
            if blas_saved > threads:
                le_blas_set_threads(threads)
            else:
                blas_saved = 0
        cdef QW qruns[2]
        cdef QW* qrun = NULL
        # int8's scratch, in bytes (quantized kernels are float32)
        cdef Py_ssize_t qoff = general_work(dims.B, dims.T, <Py_ssize_t>dims.G * dims.H, dims.H, dims.P,
                                            0).quant * 4
        hstride = <Py_ssize_t>dims.B * dims.P * self.dtype.itemsize
        cstride = <Py_ssize_t>dims.B * dims.H * self.dtype.itemsize
        with nogil:
            for dirn in range(dims.D):
                if self.is_double:
                    run_direction[double](&dims, dirn, <double*>xd, <double*>yd,
                                          <double*>(hd + dirn * hstride),
                                          <double*>(cd + dirn * cstride), m,
                                          <double*>self.w_ih[dirn], <double*>self.w_hh[dirn],
                                          <double*>self.w_hr[dirn], <double*>self.bias[dirn],
                                          <double*>self.bias_hn[dirn], <double*>wd, NULL, threads)
                elif fast:
                    ran = run_fast_direction(&dims, dirn, <float*>xd, <float*>yd,
                                             <float*>(hd + dirn * hstride), <float*>(cd + dirn * cstride), m,
                                             <float*>self.w_ih[dirn], <float*>self.w_hh[dirn],
                                             <float*>self.bias[dirn], <float*>self.bias_hn[dirn],
                                             <float*>wd, threads, tab + dirn * table_step if tab != NULL else NULL,
                                             ids, lens, rows)
                    used = max(used, ran)
                else:
                    if self.quantized:
                        qruns[dirn] = self.q[dirn]
                        qruns[dirn].scratch = wd + qoff
                        qrun = &qruns[dirn]
                    run_direction[float](&dims, dirn, <float*>xd, <float*>yd,
                                         <float*>(hd + dirn * hstride),
                                         <float*>(cd + dirn * cstride), m,
                                         <float*>self.w_ih[dirn], <float*>self.w_hh[dirn],
                                         <float*>self.w_hr[dirn], <float*>self.bias[dirn],
                                         <float*>self.bias_hn[dirn], <float*>wd,
                                         qrun if self.quantized else NULL, threads)
            if blas_saved:
                le_blas_set_threads(blas_saved)
        return used


cdef enum:
    CHAIN_MAX = LE_CHAIN_MAX  # layers, and heads, a ChainStep takes
    EMB_FLOAT = -1  # ChainStep's Embedding in the layers' own dtype (the quantized ones are LE_W_* kinds)


cdef class ChainStep:
    """One step of a chain [token table or Embedding ->] recurrent layers [-> Dense heads], for B rows, in one call.

    What a session's step() runs for such a chain (lstm_engine.plan.chain_step builds it from the
    plan): the same kernels, packed weights and table as the plan's own steps, with every buffer
    bound once. Layers on the C kernels (float32 LSTM/GRU) run from here without Python, those that
    follow each other as one job on the engine's threads (le_run_chain_f32); the others
    (float64, proj_size, RNN, GRU reset before, quantized, general gates) through their run().
    An Embedding that no token table folds (a quantized one, or one before a layer off the C kernels)
    has its rows looked up (and widened) into a bound buffer, the first layer's input.
    Heads (float32 only): Dense with a linear or relu activation, each row on the engine's GEMV over
    the last layer's threads (dense_row), or all rows through one packed product (a quantized head).
    """
    cdef int B, n_layers, n_heads, takes_ids, in_size, out_size, typenum
    cdef Py_ssize_t vocab
    cdef Py_ssize_t step_bytes[CHAIN_MAX]
    cdef le_steps_args args[CHAIN_MAX]
    cdef bint c_steps[CHAIN_MAX]  # the layer runs on the C kernels from here (le_run_chain_f32)
    cdef const float* head_w[CHAIN_MAX]
    cdef const float* head_b[CHAIN_MAX]
    cdef float* head_out[CHAIN_MAX]
    cdef int head_n[CHAIN_MAX]
    cdef int head_k[CHAIN_MAX]
    cdef int head_relu[CHAIN_MAX]
    cdef const le_qmat* head_q[CHAIN_MAX]  # a quantized head's packed weight, else NULL
    cdef void* head_scratch[CHAIN_MAX]
    cdef int emb_kind  # the Embedding looked up here: 0 none, EMB_FLOAT (the layers' dtype), or an LE_W_* kind
    cdef const char* emb_w
    cdef const float* emb_scale
    cdef Py_ssize_t emb_row  # bytes per row of emb_w
    cdef char* x0  # (B, input_size): the looked-up rows
    cdef object x0arr
    cdef list kernels, runs
    cdef tuple _keep

    def __init__(self, int batch, object table, list kernels, list states, list heads, int input_size,
                 object embedding=None):
        """table: (1, V, G*Hp) from the first kernel's input_table, or None (float input of
        input_size); embedding, instead of a table: (kind, weight (V, input_size), scale) with kind "float"
        (weight of the layers' dtype), "int8" (scale float32 (V,)), "float16" or "bfloat16" (weight the
        uint16 bits); kernels and states (h, c) per layer; heads: (weight, bias or None, relu) with weight
        float32 (N, K) or a PackedWeight."""
        cdef int i
        cdef RecurrentKernel k
        cdef PackedWeight pw
        cdef cnp.ndarray w, b, buf
        if not 0 < len(kernels) <= CHAIN_MAX or len(heads) > CHAIN_MAX or len(states) != len(kernels):
            raise ValueError("ChainStep: 1 to 8 recurrent layers and at most 8 heads")
        dtype = kernels[0].dtype
        if heads and dtype != np.float32:
            raise ValueError("ChainStep: heads run in float32 only")
        keep = [table]
        self.B = batch
        self.kernels = list(kernels)
        self.runs = []
        self.n_layers = len(kernels)
        self.n_heads = len(heads)
        if table is not None and embedding is not None:
            raise ValueError("ChainStep: a token table or an Embedding, not both")
        self.takes_ids = table is not None or embedding is not None
        self.in_size = input_size
        self.typenum = dtype.num
        self.vocab = table.shape[1] if table is not None else 0
        self.emb_kind = 0
        if embedding is not None:
            kind, ew, es = embedding
            want = dtype if kind == "float" else np.int8 if kind == "int8" else np.uint16
            if (kind not in ("float", *WEIGHT_KINDS) or (kind != "float" and dtype != np.float32)
                    or not isinstance(ew, np.ndarray) or ew.dtype != want or ew.ndim != 2
                    or ew.shape[1] != input_size or not ew.flags.c_contiguous):
                raise ValueError("ChainStep: the Embedding does not match the first layer")
            if kind == "int8":
                if (not isinstance(es, np.ndarray) or es.dtype != np.float32 or es.shape != (ew.shape[0],)
                        or not es.flags.c_contiguous):
                    raise ValueError("ChainStep: an int8 Embedding needs float32 scales (V,)")
                self.emb_scale = <const float*>cnp.PyArray_DATA(<cnp.ndarray>es)
            self.emb_kind = EMB_FLOAT if kind == "float" else WEIGHT_KINDS[kind]
            self.emb_w = <const char*>cnp.PyArray_DATA(<cnp.ndarray>ew)
            self.emb_row = ew.shape[1] * ew.dtype.itemsize
            self.vocab = ew.shape[0]
            self.x0arr = np.empty((batch, 1, input_size), dtype)
            self.x0 = <char*>cnp.PyArray_DATA(<cnp.ndarray>self.x0arr)
            keep += [ew, es, self.x0arr]
        size = input_size
        for i in range(self.n_layers):
            k = kernels[i]
            if k.num_directions != 1 or k.go_backwards or k.input_size != size or k.dtype != dtype:
                raise ValueError("ChainStep: layers must be unidirectional, of one dtype, each taking the last")
            h, c = states[i][0], states[i][len(states[i]) - 1]  # (h, c), or (h,) for GRU/RNN
            for arr in (h, c):
                if arr.dtype != dtype or not arr.flags.c_contiguous or arr.shape[1] != batch:
                    raise ValueError("ChainStep: states must be C-contiguous (1, batch, width) of the layers' dtype")
            work = np.empty(k.work_size(batch, 1), dtype)
            y = np.empty((batch, 1, k.output_size), dtype)
            keep += [h, c, work, y]
            self.c_steps[i] = k.fast
            self.runs.append((k.run, h, c, work, y))
            memset(&self.args[i], 0, sizeof(le_steps_args))
            if k.fast:
                self.args[i].cell = k.cell  # CELL_LSTM or CELL_GRU: ChainStep runs only those on the C kernels
                self.args[i].B = batch
                self.args[i].In = k.input_size
                self.args[i].H = k.hidden_size
                self.args[i].T = 1
                self.args[i].y_row = k.output_size
                self.args[i].y_step = k.output_size
                self.args[i].h = <float*>cnp.PyArray_DATA(<cnp.ndarray>h)
                self.args[i].c = <float*>cnp.PyArray_DATA(<cnp.ndarray>c)
                self.args[i].w_ih = <const float*>k.w_ih[0]
                self.args[i].w_hh = <const float*>k.w_hh[0]
                self.args[i].bias = <const float*>k.bias[0]
                self.args[i].bias_hn = <const float*>k.bias_hn[0]
                self.args[i].work = <float*>cnp.PyArray_DATA(<cnp.ndarray>work)
                self.args[i].y = <float*>cnp.PyArray_DATA(<cnp.ndarray>y)
                if i > 0:
                    self.args[i].x = <const float*>cnp.PyArray_DATA(<cnp.ndarray>self.runs[i - 1][4])
                elif self.emb_kind:
                    self.args[i].x = <const float*>self.x0
            self.step_bytes[i] = <Py_ssize_t>k.num_gates * k.hidden_size * k.hidden_size * sizeof(float) * batch
            size = k.output_size
        if table is not None:
            k = kernels[0]
            if (not k.fast or not isinstance(table, np.ndarray) or table.dtype != np.float32
                    or not table.flags.c_contiguous or table.ndim != 3 or table.shape[0] != 1
                    or table.shape[2] != k.num_gates * panels(k.hidden_size) * LE_PANEL):
                raise ValueError("ChainStep: the table does not match the first layer")
            self.args[0].table = <const float*>cnp.PyArray_DATA(<cnp.ndarray>table)
        for i in range(self.n_heads):
            weight, bias, relu = heads[i]
            self.head_q[i] = NULL
            self.head_w[i] = NULL
            if isinstance(weight, PackedWeight):
                pw = weight
                if pw.cols != size:
                    raise ValueError("ChainStep: heads must take the last layer's width")
                self.head_q[i] = &pw.m
                scratch = aligned_bytes(le_qgemm_scratch(batch, size) if pw.kind == "int8" else 0)
                self.head_scratch[i] = cnp.PyArray_DATA(<cnp.ndarray>scratch)
                keep.append(scratch)
                n_out = pw.rows
            else:
                w = weight
                if w.dtype != np.float32 or not w.flags.c_contiguous or w.ndim != 2 or w.shape[1] != size:
                    raise ValueError("ChainStep: heads must be C-contiguous float32 (out, in) or packed, each "
                                     "taking the last")
                self.head_w[i] = <const float*>cnp.PyArray_DATA(w)
                n_out = w.shape[0]
            self.head_b[i] = NULL
            if bias is not None:
                b = bias
                if b.dtype != np.float32 or not b.flags.c_contiguous or b.size != n_out:
                    raise ValueError("ChainStep: a head's bias must be C-contiguous float32 (out,)")
                self.head_b[i] = <const float*>cnp.PyArray_DATA(b)
            buf = np.empty((batch, n_out), np.float32)
            keep += [weight, bias, buf]
            self.head_out[i] = <float*>cnp.PyArray_DATA(buf)
            self.head_n[i] = n_out
            self.head_k[i] = size
            self.head_relu[i] = bool(relu)
            size = n_out
        self.out_size = size
        self._keep = tuple(keep)

    def step(self, object x, object out=None, int rows=-1):
        """Run one step of valid input x into out (rows, out), made here when None (a session's step() without
        out= costs ~0.1 us less than with NumPy's np.empty); returns out, or None, with nothing touched, when
        x or out is not what this step takes as it is (then the caller checks and converts them).

        rows (default: the batch it was built for) runs the first rows of the bound states only: the
        pool binds its gather buffers once and steps batches of any size up to them."""
        cdef cnp.ndarray xa, oa
        cdef cnp.npy_intp dims[2]
        cdef int i, r, j, n = self.n_layers, B = self.B if rows < 0 else rows
        cdef Py_ssize_t V = self.vocab
        cdef const Py_ssize_t* ids = NULL
        cdef float* src
        cdef float* dst
        cdef float* y
        cdef RecurrentKernel k
        cdef int threads
        cdef int layer_threads[CHAIN_MAX]
        cdef bint last_writes_out = self.n_heads == 0
        if type(x) is not np.ndarray or not 0 < B <= self.B:
            return None
        xa = <cnp.ndarray>x
        if not cnp.PyArray_IS_C_CONTIGUOUS(xa) or not cnp.PyArray_ISBEHAVED_RO(xa):
            return None
        if self.takes_ids:
            if cnp.PyArray_TYPE(xa) != cnp.NPY_INTP or cnp.PyArray_NDIM(xa) != 1 or xa.shape[0] != B:
                return None
            ids = <const Py_ssize_t*>cnp.PyArray_DATA(xa)
            for r in range(B):
                if ids[r] < 0 or ids[r] >= V:
                    return None
        elif (cnp.PyArray_TYPE(xa) != self.typenum or cnp.PyArray_NDIM(xa) != 2 or xa.shape[0] != B
                or xa.shape[1] != self.in_size):
            return None
        if out is None:
            dims[0] = B
            dims[1] = self.out_size
            oa = cnp.PyArray_EMPTY(2, dims, self.typenum, 0)
        elif type(out) is not np.ndarray:
            return None
        else:
            oa = <cnp.ndarray>out
            if (cnp.PyArray_TYPE(oa) != self.typenum or cnp.PyArray_NDIM(oa) != 2 or oa.shape[0] != B
                    or oa.shape[1] != self.out_size or not cnp.PyArray_IS_C_CONTIGUOUS(oa)
                    or not cnp.PyArray_ISBEHAVED(oa)):
                return None
        # Past here nothing is refused: x and out are as this step takes them.
        if self.takes_ids:
            if self.emb_kind == EMB_FLOAT:
                for r in range(B):
                    memcpy(self.x0 + r * self.emb_row, self.emb_w + ids[r] * self.emb_row, self.emb_row)
            elif self.emb_kind:
                le_q_embed_rows(self.emb_kind, self.emb_w, self.emb_scale, self.in_size, ids, B, <float*>self.x0)
            else:
                self.args[0].ids = ids
        else:
            self.args[0].x = <const float*>cnp.PyArray_DATA(xa)
        if last_writes_out and self.c_steps[n - 1]:
            self.args[n - 1].y = <float*>cnp.PyArray_DATA(oa)
        i = 0
        while i < n:
            if self.c_steps[i]:
                # Layers on the C kernels one after another run as one job on the pool (le_run_chain_f32).
                j = i
                while j < n and self.c_steps[j]:
                    self.args[j].B = B
                    layer_threads[j - i] = threads_for(self.step_bytes[j] // self.B * B,
                                                       (<RecurrentKernel>self.kernels[j]).threads)
                    j += 1
                with nogil:
                    le_run_chain_f32(&self.args[i], layer_threads, j - i)
                i = j
            else:
                run, h, c, work, buf = self.runs[i]
                if B < self.B:
                    h, c, buf = h[:, :B], c[:, :B], buf[:B]
                # run() takes x as (B, 1, in); y only needs the right size (out is (B, out)).
                if i > 0:
                    x3 = (<tuple>self.runs[i - 1])[4][:B]
                else:
                    x3 = self.x0arr[:B] if self.emb_kind else xa.reshape(B, 1, self.in_size)
                run(x3, oa if i == n - 1 and last_writes_out else buf, h, c, None, work, False)
                i += 1
        if self.n_heads:
            threads = (<RecurrentKernel>self.kernels[n - 1]).threads
            y = <float*>cnp.PyArray_DATA(oa)
            src = <float*>cnp.PyArray_DATA(<cnp.ndarray>self.runs[n - 1][4])
            with nogil:
                for i in range(self.n_heads):
                    dst = y if i == self.n_heads - 1 else self.head_out[i]
                    if self.head_q[i] != NULL:  # every row in one product, as Dense.forward's
                        le_qgemm(self.head_q[i], B, src, self.head_k[i], dst, self.head_n[i], 0, self.head_b[i],
                                 threads, self.head_scratch[i])
                    else:
                        for r in range(B):
                            le_gemv_f32(self.head_n[i], self.head_k[i], self.head_w[i], self.head_k[i],
                                        src + <Py_ssize_t>r * self.head_k[i], self.head_b[i],
                                        dst + <Py_ssize_t>r * self.head_n[i],
                                        threads_for(<Py_ssize_t>self.head_n[i] * self.head_k[i]
                                                    * <Py_ssize_t>sizeof(float), threads))
                    if self.head_relu[i]:
                        for j in range(B * self.head_n[i]):
                            if dst[j] < 0:
                                dst[j] = 0
                    src = dst
        return oa


def bounds_checked():
    """Whether this build checks indexing (the LSTM_ENGINE_DEBUG=1 build); CI asserts it before the debug run."""
    cdef unsigned char[::1] whole = bytearray(2)
    cdef unsigned char[::1] first = whole[:1]
    cdef Py_ssize_t i = 1
    cdef unsigned char seen
    try:
        # Without checks this reads whole[1], which exists: the probe itself never leaves the buffer.
        seen = first[i]
    except IndexError:
        return True
    return False


# ---------------------------------------------------------------------------------------------
# int8 / float16 / bfloat16 weights (cpu_quant.c). lstm_engine.quantize makes the arrays.

WEIGHT_KINDS = {"int8": LE_W_INT8, "float16": LE_W_FLOAT16, "bfloat16": LE_W_BFLOAT16}
QUANT_VARIANTS = tuple(le_q_name(level).decode() for level in range(LE_Q_NUM_VARIANTS))
MAX_QUANT_COLUMNS = LE_Q_MAX_K


cdef cnp.ndarray aligned_bytes(Py_ssize_t n):
    """An uninitialised uint8 array of n bytes starting on a 64-byte boundary."""
    cdef cnp.npy_intp size = n + 64
    cdef cnp.ndarray buf = cnp.PyArray_EMPTY(1, &size, cnp.NPY_UINT8, 0)
    cdef Py_ssize_t skip = (64 - <size_t>cnp.PyArray_DATA(buf) % 64) % 64
    return buf[skip:skip + n]


cdef class PackedWeight:
    """A weight (N, K) packed once in 16-row panels for the int8 / float16 / bfloat16 products.

    kind "int8": ``weight`` int8 (N, K) in [-127, 127] and ``scale`` float32 (N,), finite and >= 0
    (weight ~ q * scale[:, None]); "float16" / "bfloat16": ``weight`` the uint16 bit patterns (N, K).
    """
    cdef le_qmat m
    cdef readonly str kind
    cdef readonly int rows, cols
    cdef object _packed, _scale, _comp

    def __init__(self, str kind, object weight, object scale=None):
        if kind not in WEIGHT_KINDS:
            raise ValueError(f"PackedWeight: kind must be one of {sorted(WEIGHT_KINDS)}, got {kind!r}")
        want = np.int8 if kind == "int8" else np.uint16
        if not isinstance(weight, np.ndarray) or weight.dtype != want or weight.ndim != 2 or not weight.flags.c_contiguous:
            raise TypeError(f"PackedWeight: a {kind} weight must be a C-contiguous 2-D {np.dtype(want)} array, "
                            f"got {getattr(weight, 'dtype', type(weight).__name__)} of shape {np.shape(weight)}")
        N, K = weight.shape[0], weight.shape[1]
        if not (0 < N < 2**31 and 0 < K <= LE_Q_MAX_K):
            raise ValueError(f"PackedWeight: shape {(N, K)} must have rows and 1..{LE_Q_MAX_K} columns")
        self.kind, self.rows, self.cols = kind, N, K
        self.m.kind = WEIGHT_KINDS[kind]
        self.m.N = N
        self.m.K = K
        Np = panels(N) * LE_PANEL
        packed = aligned_bytes(le_qmat_size(self.m.kind, N, K))
        comp = np.zeros(Np, np.int32)
        if kind == "int8":
            scale = np.asarray(scale)
            if scale.dtype != np.float32 or scale.shape != (N,):
                raise TypeError(f"PackedWeight: int8 scales must be float32 of shape ({N},), got "
                                f"{scale.dtype} of shape {scale.shape}")
            if not np.all(np.isfinite(scale) & (scale >= 0)):
                raise ValueError("PackedWeight: int8 scales must be finite and >= 0")
            if weight.size and int(weight.min()) < -127:
                raise ValueError("PackedWeight: int8 weights must lie in [-127, 127] (symmetric)")
            padded = np.zeros(Np, np.float32)
            padded[:N] = scale
            self._scale = padded
            self.m.scale = <const float*>cnp.PyArray_DATA(<cnp.ndarray>padded)
        le_qmat_pack(self.m.kind, cnp.PyArray_DATA(<cnp.ndarray>weight), N, K, cnp.PyArray_DATA(packed),
                     <int*>cnp.PyArray_DATA(comp))
        self._packed, self._comp = packed, comp
        self.m.w = cnp.PyArray_DATA(packed)
        self.m.comp = <const int*>cnp.PyArray_DATA(comp)

    @property
    def nbytes(self):
        """Bytes the packed weights take (what a product reads)."""
        return self._packed.nbytes + (0 if self._scale is None else self._scale.nbytes)


cdef const le_qmat* _qmat(object w) except? NULL:
    if w is None:
        return NULL
    return &(<PackedWeight?>w).m


def dense_packed(PackedWeight weight, cnp.ndarray x, object bias, cnp.ndarray out, int threads=1):
    """out (M, N) = x (M, K) @ weight^T (+ bias (N,)) with a packed int8/float16/bfloat16 weight.

    float32, C-contiguous (a mismatch raises ValueError rather than reading out of bounds); int8
    quantizes each row of x on the fly."""
    cdef int M, N = weight.rows, K = weight.cols
    cdef const float* b = NULL
    cdef const float* xd
    cdef float* od
    if (cnp.PyArray_NDIM(x) != 2 or x.shape[1] != K or cnp.PyArray_TYPE(x) != cnp.NPY_FLOAT32
            or not cnp.PyArray_IS_C_CONTIGUOUS(x)):
        raise ValueError(f"dense_packed: x must be a C-contiguous float32 (M, {K}) array")
    M = x.shape[0]
    if (cnp.PyArray_TYPE(out) != cnp.NPY_FLOAT32 or cnp.PyArray_SIZE(out) != <Py_ssize_t>M * N
            or not cnp.PyArray_IS_C_CONTIGUOUS(out)):
        raise ValueError(f"dense_packed: out must be a C-contiguous float32 array of {M} x {N}")
    if bias is not None:
        if (cnp.PyArray_TYPE(<cnp.ndarray>bias) != cnp.NPY_FLOAT32 or cnp.PyArray_SIZE(<cnp.ndarray>bias) != N
                or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>bias)):
            raise ValueError(f"dense_packed: bias must be C-contiguous float32 of {N}")
        b = <const float*>cnp.PyArray_DATA(<cnp.ndarray>bias)
    xd = <const float*>cnp.PyArray_DATA(x)
    od = <float*>cnp.PyArray_DATA(out)
    scratch = aligned_bytes(le_qgemm_scratch(M, K) if weight.kind == "int8" else 0)
    cdef void* sd = cnp.PyArray_DATA(<cnp.ndarray>scratch)
    with nogil:
        le_qgemm(&weight.m, M, xd, K, od, N, 0, b, threads, sd)
    return out


def quant_variant():
    """The int8/float16/bfloat16 product variant in use (a name of QUANT_VARIANTS)."""
    return QUANT_VARIANTS[le_q_level()]


def set_quant_variant(level):
    """Force a product variant by name or number (QUANT_VARIANTS), or let dispatch choose (None / -1).

    For tests and benchmarks; ValueError names what the CPU lacks."""
    level = _variant_number(level, QUANT_VARIANTS, "product variant")
    if le_q_set_level(level) != 0:
        raise ValueError(f"product variant {QUANT_VARIANTS[level]!r} cannot run here: {le_q_reason(level).decode()}")


def quant_variant_supported(level):
    """(True, why) when this CPU runs the product variant (name or number), else (False, what it lacks)."""
    if isinstance(level, str):
        level = QUANT_VARIANTS.index(level)
    return bool(le_q_supported(level)), le_q_reason(level).decode()
