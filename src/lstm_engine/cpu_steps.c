/* Weight packing, and one direction of a layer over its steps on the engine's threads.
 *
 * The packed layout (see _cpu.h) is one for every variant: 16 units of each gate side by side per
 * row of a panel, a whole AVX-512 register or two AVX2 ones, so a tile of sums holds every gate of
 * 16 units and the gates are applied right after the product, and forcing another variant needs
 * no repacking. Panels are K rows deep: a thread's panels are read front to back at every step.
 */
#define _GNU_SOURCE
#include "_cpu_impl.h"

#include <stdint.h>
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

/* The work buffer's layout, in floats from its start: the projections of every step (T, B, G * Hp), then
 * h twice (this step's, the next), each (B, H). The one place it is computed (size and run alike). */
typedef struct {
    ptrdiff_t GHp, xp, hbuf0, hbuf1, size;
} steps_work;

static steps_work steps_work_layout(int cell, int B, int H, int T)
{
    steps_work w;
    w.GHp = (ptrdiff_t)(cell == CELL_LSTM ? 4 : 3) * panels_of(H) * LE_PANEL;
    w.xp = 0;
    w.hbuf0 = w.xp + (ptrdiff_t)T * B * w.GHp;
    w.hbuf1 = w.hbuf0 + (ptrdiff_t)B * H;
    w.size = w.hbuf1 + (ptrdiff_t)B * H;
    return w;
}

ptrdiff_t le_steps_work_size(int cell, int B, int H, int T)
{
    return steps_work_layout(cell, B, H, T).size;
}

/* The work of one call, in phases: the input projection of every step (phase 0; none for one row
 * and one step, which fuses both products), then each step (phase s + 1). A phase is cut into units
 * and each thread has its own range of them: a step's units are its panels, so each thread keeps
 * the same slice of the weights every step, in its own L2 (DeepCPU's weight-centric split). A
 * thread that has finished its range takes units from the others' ranges, so a thread that lost
 * its core (or a worker that never came: cpu_pool.c) holds nobody up beyond the unit it is in.
 * Each unit is computed the same way whoever runs it, so results never depend on the threads. */
#define MAX_PARTS 64
#define STALL_NS 100000L
#define PROJECT_ROWS 48 /* rows of a projection unit: whole micro-kernel tiles for 3, 4, 6 and 8 rows */

typedef struct {
    le_steps_args *a;
    const le_variant *v;
    int nth, P, fused;
    int flip;                   /* step s + 1 runs backwards when s + 1 + flip is odd (backwards()) */
    int chunks, groups, U0;     /* projection units: chunks of rows x groups of panels */
    float *xp, *hbuf[2];
    ptrdiff_t GHp;
    atomic_int next[MAX_PARTS]; /* claims made in range r so far, over every phase */
    atomic_int done;            /* units finished, over every phase */
    atomic_int phase;           /* the latest phase begun: where a late worker starts */
} steps_job;

static int range_start(int U, int r, int nth) { return (int)((long)U * r / nth); }

static int units_in(const steps_job *job, int phase) { return phase == 0 ? job->U0 : job->P; }

/* Units of every phase before this one, and range r's claims before it. */
static long units_before(const steps_job *job, int phase)
{
    return phase == 0 ? 0 : job->U0 + (long)(phase - 1) * job->P;
}

static int claims_before(const steps_job *job, int r, int phase)
{
    int proj = range_start(job->U0, r + 1, job->nth) - range_start(job->U0, r, job->nth);
    int step = range_start(job->P, r + 1, job->nth) - range_start(job->P, r, job->nth);
    return phase == 0 ? 0 : proj + (phase - 1) * step;
}

/* Whether step phase runs its range's panels last to first. A thread's slice of the weights is about
 * its whole L2 (LSTM 512: 2 MB of W_hh per core of 2; 4 MB on one), and read in the same order every
 * step the cache's LRU-like replacement evicts each line just before it is needed again: almost every
 * line came from L3. Turned around every other step, a step begins with the panels the previous one
 * read last, still in L2 (a 2 MB slice cycled on one core: 29 -> 21 us; 2.5 MB: 62 -> 35 us; 4 MB:
 * 146 -> 96 us). Each unit is computed the same way in either order. */
static int backwards(const steps_job *job, int phase)
{
    return phase > 0 && ((phase + job->flip) & 1);
}

/* The next unclaimed unit of range r in this phase, or -1. */
static int claim(steps_job *job, int r, int phase)
{
    int U = units_in(job, phase), first = range_start(U, r, job->nth), n = range_start(U, r + 1, job->nth) - first;
    int base = claims_before(job, r, phase), end = base + n;
    int v = atomic_load_explicit(&job->next[r], memory_order_relaxed);
    while (v < end)
        if (atomic_compare_exchange_weak_explicit(&job->next[r], &v, v + 1, memory_order_relaxed,
                                                  memory_order_relaxed))
            return first + (backwards(job, phase) ? n - 1 - (v - base) : v - base);
    return -1;
}

typedef struct {
    steps_job *job;
    long target;
} done_wait;

static int reached(void *p)
{
    done_wait *w = p;
    return atomic_load_explicit(&w->job->done, memory_order_acquire) >= w->target;
}

/* Rows still going at step t: with lengths (sorted longest first) a prefix of the batch. */
static int active_rows(const le_steps_args *a, int t)
{
    if (!a->lengths)
        return a->B;
    int n = 0;
    while (n < a->B && a->lengths[n] > t)
        n++;
    return n;
}

static void run_unit(steps_job *job, le_block *blk, int phase, int u, int active)
{
    le_steps_args *a = job->a;
    if (phase == 0) {
        int chunk = u / job->groups, group = u % job->groups;
        int r0 = chunk * PROJECT_ROWS, rows = a->B * a->T;
        int r1 = r0 + PROJECT_ROWS < rows ? r0 + PROJECT_ROWS : rows;
        int p0 = range_start(job->P, group, job->groups), p1 = range_start(job->P, group + 1, job->groups);
        if (!a->lengths) {
            job->v->block(blk, r0, r1, p0, p1);
            return;
        }
        /* Only the valid steps of each row (x's row b * T + t): padded steps are never read. */
        for (int b = r0 / a->T; b * a->T < r1; b++) {
            int s0 = b * a->T > r0 ? b * a->T : r0, s1 = b * a->T + a->lengths[b];
            if (s1 > r1)
                s1 = r1;
            if (s0 < s1)
                job->v->block(blk, s0, s1, p0, p1);
        }
        return;
    }
    job->v->block(blk, 0, active, u, u + 1);
    /* Rows past their length: the state carries over, the output is zero. */
    int u0 = u * LE_PANEL, n = a->H - u0 < LE_PANEL ? a->H - u0 : LE_PANEL;
    for (int r = active; r < a->B; r++) {
        memcpy(blk->h_out + (ptrdiff_t)r * a->H + u0, blk->h_in + (ptrdiff_t)r * a->H + u0, n * sizeof(float));
        memset(blk->y + (a->y_rows ? a->y_rows[r] : r) * blk->y_row + u0, 0, n * sizeof(float));
    }
}

/* The block of a phase: the projection, or step phase - 1. */
static void phase_block(steps_job *job, le_block *blk, int phase)
{
    le_steps_args *a = job->a;
    int H = a->H, In = a->In, T = a->T;
    memset(blk, 0, sizeof *blk);
    blk->G = a->cell == CELL_LSTM ? 4 : 3;
    blk->H = H;
    if (phase == 0) {
        blk->mode = MODE_PROJECT;
        blk->A = a->x;
        blk->lda = In;
        blk->K = In;
        blk->W = a->w_ih;
        blk->add = a->bias;
        /* Time-major projections: a step's rows are then one contiguous block, not B rows a
         * whole sequence of projections apart (B pages apart for the batch workload). */
        blk->out = job->xp;
        blk->ldo = job->GHp;
        blk->steps = T;
        blk->rows = a->B;
        return;
    }
    int s = phase - 1, t = a->reverse ? T - 1 - s : s;
    blk->mode = a->cell == CELL_LSTM ? MODE_LSTM : MODE_GRU;
    blk->A = blk->h_in = job->hbuf[s & 1];
    blk->h_out = job->hbuf[(s + 1) & 1];
    blk->lda = H;
    blk->K = H;
    blk->W = a->w_hh;
    blk->bias_hn = a->bias_hn;
    blk->c = a->c;
    blk->y = a->y + (ptrdiff_t)t * a->y_step;
    blk->y_row = a->y_row;
    blk->y_rows = a->y_rows;
    blk->y_back = (a->reverse ? 1 : -1) * a->y_step;
    blk->mask = a->mask ? a->mask + t : NULL;
    blk->mask_row = T;
    blk->zero_masked = a->zero_masked;
    blk->first = s == 0;
    if (job->fused) {
        blk->A2 = a->x + (ptrdiff_t)t * In;
        blk->lda2 = (ptrdiff_t)T * In;
        blk->W2 = a->w_ih;
        blk->K2 = In;
        blk->bias = a->bias;
        blk->add = a->bias;
    } else {
        blk->add = job->xp + (ptrdiff_t)t * a->B * job->GHp;
        blk->ld_add = job->GHp;
    }
}

/* Whether each step computes its own input product with the recurrent one, in the same tiles (no
 * phase 0): one row and one step (nothing to batch), and an LSTM over many rows. There the product
 * of a step is a GEMM either way, and projecting every step ahead wrote T * B * G * Hp floats
 * (32 MB for the batch workload) that each step then read back from beyond L2: with their page
 * faults, 10 % of that workload's time (perf). A few rows keep the projection: their step is bound
 * by reading the weights, which the fused step reads twice as many of. GRU keeps it over many
 * rows (its input part is kept apart from the recurrent one, a tile per row). The work buffer
 * keeps room for the projections either way: its pages are never touched when unused. */
#define FUSE_MIN_ROWS 32

static int fuse_steps(const le_steps_args *a)
{
    if (a->table)
        return 0;
    if (a->B == 1 && a->T == 1)
        return 1;
    return a->cell == CELL_LSTM && (a->T == 1 || a->B >= FUSE_MIN_ROWS);
}

/* Before taking units of another thread's range, give its owner as long as this thread took for its
 * own range to begin it: a worker that joins a moment after the caller then still runs its own
 * panels, whose weights are in its own L2; taking them would move them to the other core's. A
 * worker that does not begin in that time lost its core (or never came): its units are taken. */
typedef struct {
    steps_job *job;
    int r, untouched;
    long until;
} head_start;

static int owner_began_or_late(void *p)
{
    head_start *h = p;
    return atomic_load_explicit(&h->job->next[h->r], memory_order_relaxed) != h->untouched || le_now_ns() >= h->until;
}

/* Wait, before taking range r's units in this phase, until its owner began them or had as long as this
 * thread took (since `started`) to begin its own. An owner that has not joined the job is not waited
 * for: a worker without a core cost every phase half a step again (cpu_pool.c, le_pool_joined). */
static void give_head_start(steps_job *job, int r, int phase, long started)
{
    if (r > le_pool_joined())
        return;
    long now = le_now_ns();
    head_start h = {job, r, claims_before(job, r, phase), now + (now - started)};
    le_wait_until(owner_began_or_late, &h);
}

static void steps_run(void *arg, int tid, int nth)
{
    steps_job *job = arg;
    int T = job->a->T;
    int phase = atomic_load_explicit(&job->phase, memory_order_relaxed);
    if (phase < (job->fused ? 1 : 0))
        phase = job->fused ? 1 : 0;
    le_block blk;
    long worked = 0;
    for (; phase <= T; phase++) {
        done_wait w = {job, units_before(job, phase)};
        /* Waiting long, and longer than this thread's own work of the phase, for a unit another
         * thread holds: that thread lost its core. */
        long waited = le_wait_until(reached, &w);
        if (waited > STALL_NS && waited > 2 * worked)
            le_pool_note_stall();
        long started = le_now_ns();
        int seen = atomic_load_explicit(&job->phase, memory_order_relaxed);
        while (seen < phase && !atomic_compare_exchange_weak_explicit(&job->phase, &seen, phase, memory_order_relaxed,
                                                                      memory_order_relaxed))
            ;
        phase_block(job, &blk, phase);
        int active = phase == 0 ? 0 : active_rows(job->a, job->a->reverse ? T - phase : phase - 1);
        /* Own range first, then the others' leftovers. */
        for (int k = 0; k < nth; k++) {
            int r = (tid + k) % nth, u;
            if (k > 0)
                give_head_start(job, r, phase, started);
            while ((u = claim(job, r, phase)) >= 0) {
                run_unit(job, &blk, phase, u, active);
                atomic_fetch_add_explicit(&job->done, 1, memory_order_release);
            }
        }
        worked = le_now_ns() - started;
    }
    /* The caller returns only when every unit is done: the state is then complete. */
    done_wait w = {job, units_before(job, T + 1)};
    if (tid == 0)
        le_wait_until(reached, &w);
}

/* The table's rows for the projections (x is then not read: phase 0 is empty). */
static void steps_look_up(steps_job *job)
{
    le_steps_args *a = job->a;
    if (a->B == 1 && a->T == 1)
        job->xp = (float *)(a->table + a->ids[0] * job->GHp);
    else
        for (int b = 0; b < a->B; b++)
            for (int t = 0; t < (a->lengths ? a->lengths[b] : a->T); t++)
                memcpy(job->xp + ((ptrdiff_t)t * a->B + b) * job->GHp,
                       a->table + a->ids[(ptrdiff_t)b * a->T + t] * job->GHp, job->GHp * sizeof(float));
}

/* Sets job up for a's run on at most nthreads threads (nothing shared yet); returns the threads it can use and
 * adds its work to *flops and its largest step's to *step_flops. */
static int steps_setup(steps_job *job, le_steps_args *a, int nthreads, double *flops, double *step_flops)
{
    int P = panels_of(a->H);
    memset(job, 0, sizeof *job);
    job->a = a;
    job->v = le_variant_in_use();
    job->P = P;
    job->fused = fuse_steps(a);
    /* A streaming caller runs one step per call: each call turns the order of the last call on the
     * same weights around (a few slots by address; a collision only costs a turn). */
    static atomic_uint turns[64];
    job->flip = (int)(atomic_fetch_add_explicit(&turns[((uintptr_t)a->w_hh >> 6) % 64], a->T, memory_order_relaxed) & 1);
    steps_work w = steps_work_layout(a->cell, a->B, a->H, a->T);
    job->GHp = w.GHp;
    job->xp = a->work + w.xp; /* (T, B, G * Hp) */
    job->hbuf[0] = a->work + w.hbuf0;
    job->hbuf[1] = a->work + w.hbuf1;
    memcpy(job->hbuf[0], a->h, (ptrdiff_t)a->B * a->H * sizeof(float));
    if (a->table)
        steps_look_up(job);
    /* Each thread needs at least one panel. */
    if (nthreads > P)
        nthreads = P;
    if (nthreads > MAX_PARTS)
        nthreads = MAX_PARTS;
    double step = 2.0 * a->B * job->GHp * (job->fused ? a->In + a->H : a->H);
    *step_flops = step > *step_flops ? step : *step_flops;
    /* A table's projections are looked up, not computed. */
    *flops += 2.0 * a->B * a->T * job->GHp * ((a->table ? 0 : a->In) + a->H);
    return nthreads;
}

/* The job's threads are known: its ranges and projection units follow. */
static void steps_share(steps_job *job, int used)
{
    le_steps_args *a = job->a;
    job->nth = used;
    if (!job->fused && !a->table) {
        /* Enough projection units for every thread to have a few (each an A chunk read once). */
        job->chunks = (a->B * a->T + PROJECT_ROWS - 1) / PROJECT_ROWS;
        job->groups = (4 * used + job->chunks - 1) / job->chunks;
        job->groups = job->groups < 1 ? 1 : (job->groups > job->P ? job->P : job->groups);
        job->U0 = job->chunks * job->groups;
    }
    for (int r = 0; r < MAX_PARTS; r++)
        atomic_init(&job->next[r], 0);
    atomic_init(&job->done, 0);
    atomic_init(&job->phase, 0);
}

/* Layers of one step, each reading the last one's output, in ONE pool job: a layer's run on the pool
 * (waking the workers, joining them) cost more than a stream step of LSTM 256 x2 can spare. Between
 * two layers every thread waits until the first is done (the next one's input is its whole output),
 * within the job; each thread keeps its own ranges of every layer's panels. */
typedef struct {
    steps_job *jobs;
    int n;
    atomic_int layer; /* the latest layer begun: where a late worker starts */
} chain_job;

static void chain_run(void *arg, int tid, int nth)
{
    (void)nth;
    chain_job *chain = arg;
    for (int l = atomic_load_explicit(&chain->layer, memory_order_relaxed); l < chain->n; l++) {
        steps_job *job = &chain->jobs[l];
        long started = le_now_ns();
        int seen = atomic_load_explicit(&chain->layer, memory_order_relaxed);
        while (seen < l && !atomic_compare_exchange_weak_explicit(&chain->layer, &seen, l, memory_order_relaxed,
                                                                  memory_order_relaxed))
            ;
        if (tid < job->nth)
            steps_run(job, tid, job->nth);
        if (l + 1 == chain->n)
            break; /* the caller waits for the last layer in steps_run */
        done_wait w = {job, units_before(job, job->a->T + 1)};
        long worked = le_now_ns() - started, waited = le_wait_until(reached, &w);
        if (waited > STALL_NS && waited > 2 * worked)
            le_pool_note_stall();
    }
}

int le_run_chain_f32(le_steps_args *layers, const int *nthreads, int n)
{
    steps_job jobs[LE_CHAIN_MAX];
    int most = 1, wanted[LE_CHAIN_MAX];
    double flops = 0, step_flops = 0;
    for (int l = 0; l < n; l++) {
        wanted[l] = steps_setup(&jobs[l], &layers[l], nthreads[l], &flops, &step_flops);
        most = wanted[l] > most ? wanted[l] : most;
    }
    int used = le_pool_acquire(most, flops, step_flops);
    for (int l = 0; l < n; l++)
        steps_share(&jobs[l], wanted[l] < used ? wanted[l] : used);
    chain_job chain = {jobs, n};
    atomic_init(&chain.layer, 0);
    le_pool_run(chain_run, &chain, used);
    for (int l = 0; l < n; l++)
        memcpy(layers[l].h, jobs[l].hbuf[layers[l].T & 1], (ptrdiff_t)layers[l].B * layers[l].H * sizeof(float));
    return used;
}

int le_run_steps_f32(le_steps_args *a, int nthreads)
{
    return le_run_chain_f32(a, &nthreads, 1);
}

void le_project_f32(int cell, int H, int In, const float *x, int rows, const float *w_ih, const float *bias,
                    float *out)
{
    le_block blk;
    memset(&blk, 0, sizeof blk);
    blk.mode = MODE_PROJECT;
    blk.G = cell == CELL_LSTM ? 4 : 3;
    blk.H = H;
    blk.A = x;
    blk.lda = In;
    blk.K = In;
    blk.W = w_ih;
    blk.add = bias;
    blk.out = out;
    blk.ldo = (ptrdiff_t)blk.G * panels_of(H) * LE_PANEL;
    if (rows > 0)
        le_variant_in_use()->block(&blk, 0, rows, 0, panels_of(H));
}

/* One product over the threads, in the steps' owner ranges: units 0..U-1 split in nth ranges, a
 * thread takes its own range first (the same units at every call, so the same weights stay in its
 * L2), then what is left of the others' after their head start. unit(ctx, u) must compute unit u
 * the same way whichever thread runs it. */
typedef struct {
    steps_job units; /* U0 units, one phase: only its claims are used */
    void (*unit)(void *ctx, int u);
    void *ctx;
} units_job;

static void units_run(void *arg, int tid, int nth)
{
    units_job *g = arg;
    steps_job *job = &g->units;
    long started = le_now_ns();
    for (int k = 0; k < nth; k++) {
        int r = (tid + k) % nth, u;
        if (k > 0)
            give_head_start(job, r, 0, started);
        while ((u = claim(job, r, 0)) >= 0)
            g->unit(g->ctx, u);
    }
    /* le_pool_run returns once every thread that joined has finished: every claimed unit is done. */
}

int le_run_units(int U, void (*unit)(void *ctx, int u), void *ctx, int nthreads, double flops)
{
    units_job g = {.unit = unit, .ctx = ctx};
    g.units.U0 = U;
    if (nthreads > U)
        nthreads = U;
    if (nthreads > MAX_PARTS)
        nthreads = MAX_PARTS;
    int used = le_pool_acquire(nthreads, flops, flops); /* one step: the product */
    g.units.nth = used;
    for (int r = 0; r < MAX_PARTS; r++)
        atomic_init(&g.units.next[r], 0);
    le_pool_run(units_run, &g, used);
    return used;
}

/* The Dense head of a one-row step: units of GEMV_ROWS rows (128 KB of a 512-wide head: long contiguous
 * reads); every row is summed the same way whichever thread runs it. */
#define GEMV_ROWS 64

typedef struct {
    const le_variant *v;
    int N, K;
    const float *W, *x, *b;
    ptrdiff_t ldw;
    float *y;
} gemv_job;

static void gemv_unit(void *ctx, int u)
{
    const gemv_job *g = ctx;
    int n0 = u * GEMV_ROWS, n = g->N - n0 < GEMV_ROWS ? g->N - n0 : GEMV_ROWS;
    g->v->gemv(n, g->K, g->W + n0 * g->ldw, g->ldw, g->x, g->b ? g->b + n0 : NULL, g->y + n0);
}

int le_gemv_f32(int N, int K, const float *W, ptrdiff_t ldw, const float *x, const float *b, float *y, int nthreads)
{
    gemv_job g = {.v = le_variant_in_use(), .N = N, .K = K, .W = W, .x = x, .b = b, .ldw = ldw, .y = y};
    return le_run_units((N + GEMV_ROWS - 1) / GEMV_ROWS, gemv_unit, &g, nthreads, 2.0 * N * K);
}
