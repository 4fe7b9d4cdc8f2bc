/* The engine's worker pool: threads started on first use and reused; a job starts on the caller at
 * once and workers join it as they get a core, or never; idle workers spin briefly, then yield,
 * then sleep on a condition variable.
 *
 * Nothing ever waits for a worker that has not joined: on a machine where other processes hold
 * the cores, a worker may need milliseconds to be scheduled, and a job that waited for it (as a
 * barrier per step does) ran 4-6x slower with 2 threads than with 1. Jobs share their work out in
 * units that any thread may claim (cpu_steps.c), so the caller alone finishes a job whose workers
 * never came, and a worker arriving late takes what is left.
 */
#define _GNU_SOURCE
#include "_cpu_impl.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#ifdef LE_X86
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

#define MAX_THREADS 64
/* An idle worker spins for the next job, first tightly, then yielding its core at each turn (a
 * BLAS call in between, a Dense head of milliseconds, gets the core when it wants it), then sleeps.
 * Back-to-back streaming calls and the next layer of a step find it spinning. A short job is
 * offered only to workers spinning tightly, known to be on a core: waking a sleeper costs a short
 * job more than the worker's help is worth, so that call runs on one thread and the workers,
 * poked, spin tightly for the next. Tightly for 200 us: a streaming step of a model whose weights
 * outgrow one L2 (LSTM 256 x2, 4.2 MB) takes ~35 us with both cores, each keeping its half of the
 * weights, plus the caller's Python between steps; at 20 us the worker had often stopped spinning
 * by the next step, which then ran on one core from L3 (35-145 us a step, 1.8x ONNX Runtime's
 * two threads; 35-40 us with 200). While contended, idle workers sleep at once anyway. */
#define IDLE_PAUSE_NS 200000L
#define IDLE_YIELD_NS 500000L
/* A thread waiting for others (the end of a step) yields its core once the wait passes this. */
#define WAIT_YIELD_NS 50000L
/* A job over this much work wakes sleeping workers: worth it, and one that does not come in time
 * costs nothing (it joins late or never). */
#define PATIENT_FLOPS 2e7

/* The job's entry word: generation (high 32 bits), open (bit 31), workers joined (low bits). */
#define OPEN ((uint64_t)1 << 31)
#define JOINED_MASK ((uint64_t)0xffff)

static struct {
    pthread_mutex_t busy;  /* held by the one caller that has the workers; others run alone */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int started;           /* workers running: tids 1..started */
    atomic_uint generation;
    _Atomic uint64_t entry;
    atomic_int left;       /* joined workers that have finished the job */
    atomic_int sleeping;   /* workers waiting on the condition variable */
    job_fn fn;
    void *arg;
    int nth;
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER};

long le_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void note_gap(long gap, long now);

long le_wait_until(int (*cond)(void *), void *arg)
{
    long start = 0, t = 0;
    int spins = 0;
    while (!cond(arg)) {
        cpu_relax();
        if ((++spins & 63) == 0) {
            long prev = t;
            t = le_now_ns();
            if (!start)
                start = t;
            else {
                note_gap(t - prev, t);
                if (t - start > WAIT_YIELD_NS)
                    sched_yield();
            }
        }
    }
    return start ? t - start : 0;
}

/* After a stall (a thread waited long for a unit another thread held: that thread had lost its
 * core), calls run on one thread for a while, from 1 ms doubling up to 1 s while stalls repeat: on
 * a machine whose cores are taken, a second thread costs more than it brings. */
#define SOLO_NS_MIN 1000000L
#define SOLO_NS_MAX 1000000000L
static atomic_int stalled;
static _Atomic long solo_until;
static _Atomic long solo_backoff = SOLO_NS_MIN;

void le_pool_note_stall(void)
{
    atomic_store_explicit(&stalled, 1, memory_order_relaxed);
}

/* Contention: a thread of ours spinning (for a job, or for the others at the end of a step) found
 * over GAP_NS between two looks at the clock, a few hundred nanoseconds apart when it runs: it was
 * taken off its core for another runnable thread, so the machine has more of them than cores.
 * For a window after, idle workers sleep at once instead of spinning (a spinning worker takes
 * the core from the caller it would help: with two busy processes on two cores a stream step ran
 * 1.1-1.3x slower on two threads than on one), and only jobs of many milliseconds with coarse
 * steps use workers: any step that waits for a thread which lost its core waits milliseconds,
 * which only such a job earns back. The window is renewed while gaps are seen, and at its end if
 * a caller (its jobs running alone meanwhile, nothing of ours spins to see gaps) waited for a core
 * a tenth or more of the time it could run since it last looked (Linux's run_delay against its
 * CPU time: 0-10 % alone here with others' builds around, 40-60 % beside one or two spinning
 * processes; a single preemption, e.g. by a kernel thread, no longer keeps a quiet machine on one
 * thread). Hysteresis: when a gap comes back sooner after a window ended than the window's own
 * length, the cores were not free after all and the next window is twice as long, up to 3.2 s
 * (a machine that stays busy then pays for a trial of two threads every few seconds, not every
 * 200 ms); a gap later than that starts again from 200 ms. */
#define GAP_NS 100000L
#define CONTENDED_NS_MIN 200000000L
#define CONTENDED_NS_MAX 3200000000L
#define WAIT_SHARE_TENTHS 1
#define CONTENDED_MIN_FLOPS 2e8
#define CONTENDED_MIN_STEP_FLOPS 4e6
static _Atomic long contended_until;  /* 0: not contended, or a window a caller saw end */
static _Atomic long contended_ns = CONTENDED_NS_MIN;
static _Atomic long contention_ended; /* when a caller last saw a window end */

static void saw_gap(long now)
{
    long until = atomic_load_explicit(&contended_until, memory_order_relaxed);
    long ns = atomic_load_explicit(&contended_ns, memory_order_relaxed);
    if (now >= until) {
        /* A new window: a window that lapsed unseen ended at its `until`. */
        long ended = until ? until : atomic_load_explicit(&contention_ended, memory_order_relaxed);
        ns = ended && now - ended < ns ? (ns < CONTENDED_NS_MAX ? 2 * ns : ns) : CONTENDED_NS_MIN;
        atomic_store_explicit(&contended_ns, ns, memory_order_relaxed);
    }
    atomic_store_explicit(&contended_until, now + ns, memory_order_relaxed);
}

static void note_gap(long gap, long now)
{
    if (gap > GAP_NS)
        saw_gap(now);
}

static int contended(long now)
{
    return now < atomic_load_explicit(&contended_until, memory_order_relaxed);
}

/* The end of a window a caller sees: renewed if it waited much (above), else ended. */
static int window_end(long now, int waited)
{
    if (waited) {
        atomic_store_explicit(&contended_until, now + atomic_load_explicit(&contended_ns, memory_order_relaxed),
                              memory_order_relaxed);
        return 1;
    }
    atomic_store_explicit(&contention_ended, now, memory_order_relaxed);
    atomic_store_explicit(&contended_until, 0, memory_order_relaxed);
    return 0;
}

/* This thread's CPU time and time spent runnable without a core (ns), from /proc/thread-self/schedstat
 * (a small read, once a window); 0 where the kernel does not give it. */
static int run_times(long *cpu, long *delay)
{
    FILE *f = fopen("/proc/thread-self/schedstat", "r");
    if (!f)
        return 0;
    int ok = fscanf(f, "%ld %ld", cpu, delay) == 2;
    fclose(f);
    return ok;
}

/* Whether this thread waited for a core a tenth or more of the time it could run since it last
 * looked (its first look says yes: one more window to see). Without schedstat: whether it was
 * preempted at all (getrusage). */
static int caller_waited(void)
{
    static _Thread_local long seen_cpu = -1, seen_delay, seen_preempted;
    long cpu, delay;
    int first = seen_cpu < 0, waited;
    if (run_times(&cpu, &delay)) {
        long dc = cpu - seen_cpu, dd = delay - seen_delay;
        waited = first || 10 * dd >= WAIT_SHARE_TENTHS * (dc + dd);
        seen_cpu = cpu;
        seen_delay = delay;
    } else {
        struct rusage ru;
        long n = getrusage(RUSAGE_THREAD, &ru) == 0 ? ru.ru_nivcsw : 0;
        waited = first || n > seen_preempted;
        seen_cpu = 0;
        seen_preempted = n;
    }
    return waited;
}

/* Contended, for a caller: inside a window, or at its end if the caller waited much. */
static int caller_contended(long now)
{
    long until = atomic_load_explicit(&contended_until, memory_order_relaxed);
    if (now < until)
        return 1;
    if (!until)
        return 0;
    return window_end(now, caller_waited());
}

/* For tests: drive the rule with a given clock. event 0: a gap seen at `now`; 1 and 2: a caller
 * looks at `now`, having waited much (1) or not (2); 3: back to the start. Returns whether the pool
 * holds the machine for contended at `now` after it, and the window's length. */
int le_pool_contention(long now, int event, long *window_ns)
{
    if (event == 0)
        saw_gap(now);
    else if (event == 1 || event == 2) {
        long until = atomic_load_explicit(&contended_until, memory_order_relaxed);
        if (until && now >= until)
            window_end(now, event == 1);
    } else {
        atomic_store(&contended_until, 0);
        atomic_store(&contention_ended, 0);
        atomic_store(&contended_ns, CONTENDED_NS_MIN);
    }
    *window_ns = atomic_load_explicit(&contended_ns, memory_order_relaxed);
    return contended(now);
}

/* The cores this process may use can change while it runs (a taskset, sched_setaffinity, a
 * container's quota): the first caller after CORES_CHECK_NS reads them again (a system call and a
 * small file every 100 ms), and no job uses more threads than that. 0: not read yet. */
#define CORES_CHECK_NS 100000000L
static _Atomic long cores_checked;
static atomic_int cores_now;

static int usable_cores(long now)
{
    long t = atomic_load_explicit(&cores_checked, memory_order_relaxed);
    if ((now - t >= CORES_CHECK_NS || !t)
        && atomic_compare_exchange_strong_explicit(&cores_checked, &t, now, memory_order_relaxed, memory_order_relaxed))
        atomic_store_explicit(&cores_now, le_usable_cores(), memory_order_relaxed);
    return atomic_load_explicit(&cores_now, memory_order_relaxed);
}

/* Why jobs ran on one thread (le_pool_stats, cpu_info()["pool"]): counted per job that asked for
 * more, a relaxed add on a job of microseconds at least. */
static atomic_long stats[LE_POOL_NSTATS];

static int count(int what, int nth)
{
    atomic_fetch_add_explicit(&stats[what], 1, memory_order_relaxed);
    return nth;
}

void le_pool_stats(long out[LE_POOL_NSTATS], int *cores, int *contended)
{
    for (int i = 0; i < LE_POOL_NSTATS; i++)
        out[i] = atomic_load_explicit(&stats[i], memory_order_relaxed);
    *cores = atomic_load_explicit(&cores_now, memory_order_relaxed);
    *contended = le_now_ns() < atomic_load_explicit(&contended_until, memory_order_relaxed);
}

static unsigned start_generation[MAX_THREADS];
static atomic_int polling[MAX_THREADS]; /* worker tid spins tightly: it is on a core, now */
static atomic_uint pokes;               /* bumped to wake the workers without a job */

/* Join the job of generation gen if it is still open and has room: the tid, or 0. */
static int join(unsigned gen)
{
    uint64_t e = atomic_load_explicit(&pool.entry, memory_order_acquire);
    for (;;) {
        if ((unsigned)(e >> 32) != gen || !(e & OPEN) || (int)(e & JOINED_MASK) >= pool.nth - 1)
            return 0;
        if (atomic_compare_exchange_weak_explicit(&pool.entry, &e, e + 1, memory_order_acq_rel,
                                                  memory_order_acquire))
            return (int)(e & JOINED_MASK) + 1;
    }
}

/* For tests: workers wait this long before joining a job, as one that lost its core would. */
static _Atomic long join_delay_ns;

void le_pool_set_join_delay(long ns)
{
    atomic_store_explicit(&join_delay_ns, ns, memory_order_relaxed);
}

/* Workers that have joined the running job so far (its tids 1..joined; the caller is tid 0). */
int le_pool_joined(void)
{
    return (int)(atomic_load_explicit(&pool.entry, memory_order_acquire) & JOINED_MASK);
}

static void *worker_main(void *p)
{
    int slot = (int)(ptrdiff_t)p;
    /* The generation when this worker was made: the job that made it comes after. */
    unsigned seen = start_generation[slot];
    for (;;) {
        long start = le_now_ns(), last = start;
        unsigned poked = atomic_load_explicit(&pokes, memory_order_relaxed);
        int spins = 0;
        atomic_store_explicit(&polling[slot], 1, memory_order_relaxed);
        while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
            if ((++spins & 63) != 0) {
                cpu_relax();
                continue;
            }
            if (atomic_load_explicit(&pokes, memory_order_relaxed) != poked) {
                /* A caller found us away and ran alone: spin tightly again for the next job. */
                poked = atomic_load_explicit(&pokes, memory_order_relaxed);
                start = le_now_ns();
                last = start;
                atomic_store_explicit(&polling[slot], 1, memory_order_relaxed);
            }
            long now = le_now_ns(), idle = now - start;
            note_gap(now - last, now);
            last = now;
            if (contended(now))
                idle = IDLE_YIELD_NS; /* sleep now: spinning takes a core another thread wants */
            if (idle < IDLE_PAUSE_NS) {
                cpu_relax();
            } else if (idle < IDLE_YIELD_NS) {
                atomic_store_explicit(&polling[slot], 0, memory_order_relaxed);
                sched_yield();
            } else {
                pthread_mutex_lock(&pool.lock);
                atomic_fetch_add_explicit(&pool.sleeping, 1, memory_order_relaxed);
                while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen
                       && atomic_load_explicit(&pokes, memory_order_relaxed) == poked)
                    pthread_cond_wait(&pool.wake, &pool.lock);
                atomic_fetch_sub_explicit(&pool.sleeping, 1, memory_order_relaxed);
                pthread_mutex_unlock(&pool.lock);
                poked = atomic_load_explicit(&pokes, memory_order_relaxed);
                start = le_now_ns();
                last = start;
                atomic_store_explicit(&polling[slot], 1, memory_order_relaxed);
            }
        }
        atomic_store_explicit(&polling[slot], 0, memory_order_relaxed);
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        long delay = atomic_load_explicit(&join_delay_ns, memory_order_relaxed);
        if (delay) {
            struct timespec ts = {delay / 1000000000L, delay % 1000000000L};
            nanosleep(&ts, NULL);
        }
        int tid = join(seen);
        if (tid) {
            pool.fn(pool.arg, tid, pool.nth);
            atomic_fetch_add_explicit(&pool.left, 1, memory_order_release);
        }
    }
    return NULL;
}

static void pool_after_fork(void)
{
    /* A forked child has none of the parent's threads: start over. */
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.started = 0;
    atomic_store(&pool.sleeping, 0);
    for (int tid = 0; tid < MAX_THREADS; tid++)
        atomic_store(&polling[tid], 0);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

static void wake_sleepers(void)
{
    if (atomic_load_explicit(&pool.sleeping, memory_order_relaxed) == 0)
        return;
    pthread_mutex_lock(&pool.lock);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
}

/* The number of threads a job may use, up to nth and the usable cores (above): 1 after a stall
 * (above), under contention unless the job is long with coarse steps (above), when the workers are
 * busy with another caller's job (so two sessions stepping at once each keep one core), or, unless
 * the job is long, when no worker is spinning on a core. Above 1 the workers are reserved for this
 * caller until le_pool_run. Each job that asks for more than 1 is counted with its outcome. */
int le_pool_acquire(int nth, double flops, double step_flops)
{
    if (nth > MAX_THREADS)
        nth = MAX_THREADS;
    if (nth <= 1)
        return 1;
    long now = le_now_ns();
    count(LE_POOL_ASKED, 0);
    int cores = usable_cores(now);
    if (cores && nth > cores)
        nth = cores;
    if (nth <= 1)
        return count(LE_POOL_ONE_CORE, 1);
    if (now < atomic_load_explicit(&solo_until, memory_order_relaxed))
        return count(LE_POOL_STALLED, 1);
    if (caller_contended(now) && (flops < CONTENDED_MIN_FLOPS || step_flops < CONTENDED_MIN_STEP_FLOPS))
        return count(LE_POOL_CONTENDED, 1);
    int patient = flops > PATIENT_FLOPS;
    if (pthread_mutex_trylock(&pool.busy) != 0)
        return count(LE_POOL_BUSY, 1);
    pthread_once(&fork_once, register_fork);
    while (pool.started < nth - 1) {
        pthread_t t;
        pthread_attr_t attr;
        int slot = pool.started + 1;
        start_generation[slot] = atomic_load(&pool.generation);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker_main, (void *)(ptrdiff_t)slot);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        pool.started = slot;
    }
    if (nth > pool.started + 1)
        nth = pool.started + 1;
    int near = 0;
    for (int slot = 1; slot <= pool.started; slot++)
        near |= atomic_load_explicit(&polling[slot], memory_order_relaxed);
    if (!near && !patient) {
        atomic_fetch_add_explicit(&pokes, 1, memory_order_relaxed);
        wake_sleepers();
        count(LE_POOL_AWAY, 0);
        nth = 1;
    }
    if (nth <= 1)
        pthread_mutex_unlock(&pool.busy);
    else
        count(LE_POOL_SPLIT, 0);
    return nth;
}

static int joined_left(void *joined)
{
    return atomic_load_explicit(&pool.left, memory_order_acquire) == *(int *)joined;
}

/* Run fn as tid 0 at once; up to nth - 1 workers join as tids 1.. while the caller's fn runs. */
void le_pool_run(job_fn fn, void *arg, int nth)
{
    if (nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    pool.nth = nth;
    atomic_store_explicit(&pool.left, 0, memory_order_relaxed);
    atomic_store_explicit(&stalled, 0, memory_order_relaxed);
    unsigned gen = atomic_load_explicit(&pool.generation, memory_order_relaxed) + 1;
    atomic_store_explicit(&pool.entry, ((uint64_t)gen << 32) | OPEN, memory_order_release);
    atomic_store_explicit(&pool.generation, gen, memory_order_release);
    wake_sleepers();
    fn(arg, 0, nth);
    /* Close the entry: a worker that comes now finds it shut and never touches this job. */
    uint64_t e = atomic_fetch_and_explicit(&pool.entry, ~OPEN, memory_order_acq_rel);
    int joined = (int)(e & JOINED_MASK);
    le_wait_until(joined_left, &joined);
    if (atomic_load_explicit(&stalled, memory_order_relaxed)) {
        long backoff = atomic_load_explicit(&solo_backoff, memory_order_relaxed);
        atomic_store_explicit(&solo_until, le_now_ns() + backoff, memory_order_relaxed);
        atomic_store_explicit(&solo_backoff, backoff < SOLO_NS_MAX ? 2 * backoff : backoff, memory_order_relaxed);
    } else {
        atomic_store_explicit(&solo_backoff, SOLO_NS_MIN, memory_order_relaxed);
    }
    pthread_mutex_unlock(&pool.busy);
}
