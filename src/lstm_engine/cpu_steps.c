/* Weight packing, and one direction of a layer over its steps on the engine's threads.
 *
 * The packed layout (see _cpu.h) is one for every variant: 16 units of each gate side by side per
 * row of a panel, a whole AVX-512 register or two AVX2 ones, so a tile of sums holds every gate of
 * 16 units and the gates are applied right after the product, and forcing another variant needs
 * no repacking. Panels are K rows deep: a thread's panels are read front to back at every step.
 */
#define _GNU_SOURCE
#include "_cpu_impl.h"

#include <string.h>

static int panels_of(int H) { return (H + LE_PANEL - 1) / LE_PANEL; }

ptrdiff_t le_packed_size(int G, int H, int K)
{
    return (ptrdiff_t)panels_of(H) * K * G * LE_PANEL;
}

void le_pack_f32(const float *W, int G, int H, int K, float *out)
{
    int P = panels_of(H);
    for (int p = 0; p < P; p++)
        for (int g = 0; g < G; g++)
            for (int u = 0; u < LE_PANEL; u++) {
                int unit = p * LE_PANEL + u;
                float *o = out + (ptrdiff_t)p * K * G * LE_PANEL + g * LE_PANEL + u;
                const float *w = W + ((ptrdiff_t)g * H + unit) * K;
                for (int k = 0; k < K; k++)
                    o[(ptrdiff_t)k * G * LE_PANEL] = unit < H ? w[k] : 0.0f;
            }
}

void le_pack_bias_f32(const float *b, int G, int H, float *out)
{
    int P = panels_of(H);
    for (int p = 0; p < P; p++)
        for (int g = 0; g < G; g++)
            for (int u = 0; u < LE_PANEL; u++) {
                int unit = p * LE_PANEL + u;
                out[((ptrdiff_t)p * G + g) * LE_PANEL + u] = unit < H ? b[(ptrdiff_t)g * H + unit] : 0.0f;
            }
}

ptrdiff_t le_steps_work_size(int cell, int B, int H, int T)
{
    /* The projections of every step (B, T, G * Hp), then h twice (this step's, the next). */
    ptrdiff_t G = cell == 0 ? 4 : 3;
    return (ptrdiff_t)B * T * G * panels_of(H) * LE_PANEL + 2 * (ptrdiff_t)B * H;
}

typedef struct {
    le_steps_args *a;
    const le_variant *v;
    barrier_t barrier;
} steps_job;

/* Thread tid's panels. The hidden units are split, never the batch rows: each thread keeps the same
 * slice of the weights every step, in its own L2 (DeepCPU's weight-centric split), and each sum is
 * formed the same way whatever the split, so results never depend on the thread count. */
static void panels_of_thread(int P, int tid, int nth, int *p0, int *p1)
{
    int chunk = (P + nth - 1) / nth;
    *p0 = tid * chunk < P ? tid * chunk : P;
    *p1 = *p0 + chunk < P ? *p0 + chunk : P;
}

static void steps_run(void *arg, int tid, int nth)
{
    steps_job *job = arg;
    le_steps_args *a = job->a;
    const le_variant *v = job->v;
    int B = a->B, H = a->H, In = a->In, T = a->T, G = a->cell == 0 ? 4 : 3, P = panels_of(H);
    ptrdiff_t GHp = (ptrdiff_t)G * P * LE_PANEL, xp_row = (ptrdiff_t)T * GHp;
    int p0, p1;
    panels_of_thread(P, tid, nth, &p0, &p1);
    float *xp = a->work;
    float *hbuf[2] = {xp + (ptrdiff_t)B * xp_row, xp + (ptrdiff_t)B * xp_row + (ptrdiff_t)B * H};
    /* One row, one step: both products in one pass over the panels, nothing projected ahead. */
    int fused = B == 1 && T == 1;
    int sense = 0;
    long started = nth > 1 ? le_now_ns() : 0;
    le_block blk;
    memset(&blk, 0, sizeof blk);
    blk.G = G;
    blk.H = H;
    if (!fused && p1 > p0) {
        /* Each thread projects its own panels' columns: no barrier needed before step 0. */
        blk.mode = MODE_PROJECT;
        blk.A = a->x;
        blk.lda = In;
        blk.K = In;
        blk.W = a->w_ih;
        blk.add = a->bias;
        blk.out = xp;
        blk.ldo = GHp;
        v->block(&blk, 0, B * T, p0, p1);
    }
    blk.mode = a->cell == 0 ? MODE_LSTM : MODE_GRU;
    blk.lda = H;
    blk.K = H;
    blk.W = a->w_hh;
    blk.out = NULL;
    blk.bias_hn = a->bias_hn;
    blk.c = a->c;
    blk.y_row = a->y_row;
    blk.y_back = (a->reverse ? 1 : -1) * a->y_step;
    blk.mask_row = T;
    blk.zero_masked = a->zero_masked;
    if (fused) {
        blk.A2 = a->x;
        blk.W2 = a->w_ih;
        blk.K2 = In;
        blk.bias = a->bias;
        blk.add = a->bias;
        blk.ld_add = 0;
    } else {
        blk.ld_add = xp_row;
    }
    for (int s = 0; s < T; s++) {
        if (nth > 1 && atomic_load_explicit(&job->barrier.solo, memory_order_relaxed)) {
            /* A thread lost its core mid-call: stop meeting at barriers, thread 0 takes every panel
             * (every projection is done: each thread finished step 0 before the first barrier). */
            if (tid != 0)
                return;
            nth = 1;
            p0 = 0;
            p1 = P;
        }
        int t = a->reverse ? T - 1 - s : s;
        blk.A = blk.h_in = hbuf[s & 1];
        blk.h_out = hbuf[(s + 1) & 1];
        blk.y = a->y + (ptrdiff_t)t * a->y_step;
        blk.mask = a->mask ? a->mask + t : NULL;
        blk.first = s == 0;
        if (!fused)
            blk.add = xp + (ptrdiff_t)t * GHp;
        if (p1 > p0)
            v->block(&blk, 0, B, p0, p1);
        if (nth > 1) {
            long arrived = le_now_ns();
            le_barrier_wait(&job->barrier, &sense, arrived - started);
            started = le_now_ns();
        }
    }
}

/* A long job (over ~1 ms of work) waits for workers that are away: waking them costs it little. */
#define PATIENT_FLOPS 2e7

int le_run_steps_f32(le_steps_args *a, int nthreads)
{
    steps_job job;
    job.a = a;
    job.v = le_variant_in_use();
    ptrdiff_t BH = (ptrdiff_t)a->B * a->H;
    ptrdiff_t GHp = (ptrdiff_t)(a->cell == 0 ? 4 : 3) * panels_of(a->H) * LE_PANEL;
    float *h0 = a->work + (ptrdiff_t)a->B * a->T * GHp;
    memcpy(h0, a->h, BH * sizeof(float));
    /* Each thread needs at least one panel. */
    if (nthreads > panels_of(a->H))
        nthreads = panels_of(a->H);
    double flops = 2.0 * a->B * a->T * GHp * (a->In + a->H);
    int used = le_pool_acquire(nthreads, flops > PATIENT_FLOPS);
    le_barrier_init(&job.barrier, used);
    le_pool_run(steps_run, &job, used);
    memcpy(a->h, h0 + (a->T & 1) * BH, BH * sizeof(float));
    return used;
}
