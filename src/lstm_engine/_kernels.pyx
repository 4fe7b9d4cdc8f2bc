# Recurrent kernels: BLAS for the products, one fused loop per timestep for the gates.
#
# Everything here assumes valid input: the Python layer checks dtypes, shapes and contiguity
# before calling. The only checks kept are buffer sizes, so that a caller bug raises instead of
# writing out of bounds.
cimport numpy as cnp
from libc.math cimport exp, expf, log1p, log1pf, tanh, tanhf
from libc.string cimport memcpy, memset
from scipy.linalg.cython_blas cimport dgemm, dgemv, sgemm, sgemv

cnp.import_array()


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
        return x if x > 0 else 0
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

cdef struct Dims:
    int cell, D, In, H, P, G, B, T  # 'I' would clash with complex.h's macro
    int act, gate_act
    bint zero_masked, go_backwards


cdef inline void masked_output(floating* y, Py_ssize_t row_stride, int s, int step_back,
                               int P, bint zero) noexcept nogil:
    """Output of a masked step: zeros, or a copy of the previous step's output (Keras)."""
    if zero or s == 0:
        memset(y, 0, P * sizeof(floating))
    else:
        memcpy(y, y + step_back * row_stride, P * sizeof(floating))


cdef void run_direction(Dims* d, int dirn, floating* x, floating* y, floating* h, floating* c,
                        const unsigned char* mask, floating* w_ih, floating* w_hh,
                        floating* w_hr, floating* bias, floating* bias_hn,
                        floating* work) noexcept nogil:
    cdef int B = d.B, T = d.T, H = d.H, P = d.P, In = d.In
    cdef int GH = d.G * H
    cdef int ydim = d.D * P
    cdef Py_ssize_t xp_row = <Py_ssize_t>T * GH     # stride between batch rows in xp
    cdef Py_ssize_t y_row = <Py_ssize_t>T * ydim
    cdef floating* xp = work
    cdef floating* hp = xp + <Py_ssize_t>B * T * GH
    cdef floating* tmp = hp + <Py_ssize_t>B * GH
    cdef floating* hnew = tmp + <Py_ssize_t>B * H
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

    # Input projection of every timestep at once: xp[B*T, GH] = x[B*T, In] @ w_ih^T.
    gemm_nt(B * T, GH, In, x, In, w_ih, In, 0, xp, GH)
    step_back = 1 if reverse else -1

    for s in range(T):
        t = T - 1 - s if reverse else s
        pre = xp + <Py_ssize_t>t * GH

        if d.cell == CELL_LSTM or d.cell == CELL_RNN:
            # Recurrent product accumulated straight into this step's projections.
            gemm_nt(B, GH, P, h, P, w_hh, P, 1, pre, <int>xp_row)
        elif d.cell == CELL_GRU:
            gemm_nt(B, GH, P, h, P, w_hh, P, 0, hp, GH)
        else:
            gemm_nt(B, 2 * H, P, h, P, w_hh, P, 0, hp, GH)

        for b in range(B):
            yb = y + b * y_row + <Py_ssize_t>t * ydim + dirn * P
            if mask != NULL and not mask[<Py_ssize_t>b * T + t]:
                masked_output(yb, ydim, s, step_back, P, d.zero_masked)
                continue
            q = pre + b * xp_row
            hb = h + <Py_ssize_t>b * P
            if d.cell == CELL_LSTM:
                cb = c + <Py_ssize_t>b * H
                # Without a projection h is written in place: this step's product already read it.
                hb = tmp + <Py_ssize_t>b * H if proj else hb
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
            gemm_nt(B, H, H, tmp, H, w_hh + <Py_ssize_t>2 * H * H, H, 0, hp + 2 * H, GH)
            for b in range(B):
                if mask != NULL and not mask[<Py_ssize_t>b * T + t]:
                    continue
                q = pre + b * xp_row
                cb = hp + <Py_ssize_t>b * GH
                hb = h + <Py_ssize_t>b * H
                for j in range(H):
                    n = activate(q[2 * H + j] + bias[2 * H + j] + cb[2 * H + j], act)
                    z = cb[H + j]
                    hb[j] = (1 - z) * n + z * hb[j]
                memcpy(y + b * y_row + <Py_ssize_t>t * ydim + dirn * P, hb, H * sizeof(floating))
        elif proj:
            gemm_nt(B, P, H, tmp, H, w_hr, H, 0, hnew, P)
            for b in range(B):
                if mask != NULL and not mask[<Py_ssize_t>b * T + t]:
                    continue
                memcpy(h + <Py_ssize_t>b * P, hnew + <Py_ssize_t>b * P, P * sizeof(floating))
                memcpy(y + b * y_row + <Py_ssize_t>t * ydim + dirn * P, hnew + <Py_ssize_t>b * P,
                       P * sizeof(floating))


cdef inline void* data_or_null(object a):
    return NULL if a is None else cnp.PyArray_DATA(<cnp.ndarray>a)


cdef class RecurrentKernel:
    """One recurrent layer (every direction) in one dtype, bound to its re-laid-out weights.

    Weights per direction d: w_ih[d] (G*H, I), w_hh[d] (G*H, P), w_hr[d] (P, H) or None,
    bias[d] (G*H) with the input and recurrent biases summed where the equations allow,
    bias_hn[d] (H) (GRU only: the recurrent n bias, which stays inside the reset product).
    All C-contiguous, of one dtype; the Python layer builds them once. go_backwards runs the
    single direction from the last step to the first (Keras), writing each output at its own step.
    """
    cdef readonly int cell, num_directions, input_size, hidden_size, output_size, num_gates
    cdef readonly int act, gate_act
    cdef readonly bint is_double, go_backwards
    cdef readonly object dtype
    cdef tuple _keep
    cdef void* w_ih[2]
    cdef void* w_hh[2]
    cdef void* w_hr[2]
    cdef void* bias[2]
    cdef void* bias_hn[2]

    def __init__(self, int cell, int act, int gate_act, list w_ih, list w_hh, list w_hr,
                 list bias, list bias_hn, bint go_backwards=False):
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
        self.is_double = self.dtype.itemsize == 8
        self._keep = (w_ih, w_hh, w_hr, bias, bias_hn)
        for d in range(self.num_directions):
            self.w_ih[d] = data_or_null(w_ih[d])
            self.w_hh[d] = data_or_null(w_hh[d])
            self.w_hr[d] = data_or_null(w_hr[d])
            self.bias[d] = data_or_null(bias[d])
            self.bias_hn[d] = data_or_null(bias_hn[d])

    def work_size(self, int batch, int steps):
        """Elements of scratch one run over (batch, steps) needs."""
        cdef Py_ssize_t GH = <Py_ssize_t>self.num_gates * self.hidden_size
        return (batch * steps * GH + batch * GH + batch * self.hidden_size
                + batch * self.output_size)

    def run(self, cnp.ndarray x, cnp.ndarray y, cnp.ndarray h, cnp.ndarray c, object mask,
            cnp.ndarray work, bint zero_masked):
        """Run every direction over x (B, T, I) into y (B, T, D*P).

        h (D, B, P) and c (D, B, H) hold the initial state and receive the final one. mask is a
        uint8 (B, T) array or None; masked steps keep the state and output zeros (zero_masked)
        or the previous step's output.
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
        dims.cell = self.cell
        dims.D = self.num_directions
        dims.In = self.input_size
        dims.H = self.hidden_size
        dims.P = self.output_size
        dims.G = self.num_gates
        dims.B = x.shape[0]
        dims.T = x.shape[1]
        dims.act = self.act
        dims.gate_act = self.gate_act
        dims.zero_masked = zero_masked
        dims.go_backwards = self.go_backwards
        # Cheap guards against a caller bug turning into an out-of-bounds write.
        if (x.ndim != 3 or x.shape[2] != dims.In or x.dtype != self.dtype
                or y.size != <Py_ssize_t>dims.B * dims.T * dims.D * dims.P or y.dtype != self.dtype
                or h.size != <Py_ssize_t>dims.D * dims.B * dims.P or h.dtype != self.dtype
                or work.size < self.work_size(dims.B, dims.T) or work.dtype != self.dtype
                or (self.cell == CELL_LSTM and (c.size != <Py_ssize_t>dims.D * dims.B * dims.H
                                                or c.dtype != self.dtype))
                or (mask is not None and (<cnp.ndarray>mask).size != <Py_ssize_t>dims.B * dims.T)
                or not (x.flags.c_contiguous and y.flags.c_contiguous and h.flags.c_contiguous
                        and c.flags.c_contiguous and work.flags.c_contiguous)):
            raise ValueError("RecurrentKernel.run: buffers do not match the layer")
        if dims.B == 0 or dims.T == 0:
            return
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
                                          <double*>self.bias_hn[dirn], <double*>wd)
                else:
                    run_direction[float](&dims, dirn, <float*>xd, <float*>yd,
                                         <float*>(hd + dirn * hstride),
                                         <float*>(cd + dirn * cstride), m,
                                         <float*>self.w_ih[dirn], <float*>self.w_hh[dirn],
                                         <float*>self.w_hr[dirn], <float*>self.bias[dirn],
                                         <float*>self.bias_hn[dirn], <float*>wd)
