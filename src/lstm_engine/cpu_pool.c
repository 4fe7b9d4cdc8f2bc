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
#include <unistd.h>

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

long le_wait_until(int (*cond)(void *), void *arg)
{
    long start = 0, t = 0;
    int spins = 0;
    while (!cond(arg)) {
        cpu_relax();
        if ((++spins & 63) == 0) {
            t = le_now_ns();
            if (!start)
                start = t;
            else if (t - start > WAIT_YIELD_NS)
                sched_yield();
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

/* Contention: other processes' CPU time on the cores this process may use, from /proc/stat, less
 * this process's own (its threads, spinning ones included, never count: a pool's event loop or
 * worker thread beside the kernels' threads is not contention, and the time a thread of ours
 * waits for a core says nothing of who took it). A caller samples it at most every
 * OTHERS_CHECK_NS; what the others leave, rounded to whole cores, bounds the threads of a job, and
 * when they leave one core only jobs of many milliseconds with coarse steps use workers (any step
 * that waits for a thread which lost its core waits milliseconds, which only such a job earns
 * back; with two busy processes on two cores a stream step ran 1.1-1.3x slower on two threads than
 * on one, a batch-1 sequence 4-6x), and idle workers sleep at once instead of spinning on a core
 * another process wants. Processes at a lower priority (a higher nice) than ours are left out (one
 * at nice 10 gets about a tenth of a core beside a thread of ours; they use the cores we leave, so
 * counting them would keep us on one thread while a build runs; many of them together weigh more,
 * which the stall rule meets), and so is interrupt time. Where /proc/stat cannot be read nothing is
 * held for contended; the stall rule (above) still applies. */
#define OTHERS_CHECK_NS 100000000L
#define CONTENDED_MIN_FLOPS 2e8
#define CONTENDED_MIN_STEP_FLOPS 4e6
static _Atomic long others_checked; /* when last sampled; 0: never (the next sample only starts) */
static _Atomic long others_held;    /* for tests: no sample until then */
static atomic_int cores_left;       /* whole cores the others left at the last sample; 0: unknown */
static atomic_int contended_now;    /* they left fewer than this process may use */

/* The CPU time (clock ticks) on the cores in this thread's affinity mask: busy (at our priority or
 * above, and stolen by the hypervisor) and in all. */
static int cpu_ticks(long *busy, long *total, int *ncpu)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        return 0;
    FILE *f = fopen("/proc/stat", "r");
    if (!f)
        return 0;
    int count_nice = getpriority(PRIO_PROCESS, 0) > 0; /* our own time is there then */
    char line[512];
    *busy = *total = 0;
    *ncpu = 0;
    while (fgets(line, sizeof line, f) && strncmp(line, "cpu", 3) == 0) {
        long v[8] = {0}; /* user nice system idle iowait irq softirq steal */
        int cpu;
        if (line[3] < '0' || line[3] > '9'
            || sscanf(line + 3, "%d %ld %ld %ld %ld %ld %ld %ld %ld", &cpu, &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                      &v[6], &v[7]) < 5
            || cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &set))
            continue;
        *busy += v[0] + (count_nice ? v[1] : 0) + v[2] + v[7];
        for (int i = 0; i < 8; i++)
            *total += v[i];
        ++*ncpu;
    }
    fclose(f);
    return *ncpu > 0;
}

static void note_others(double others, int cores)
{
    int left = (int)(cores - others + 0.5);
    atomic_store_explicit(&cores_left, left < 1 ? 1 : left, memory_order_relaxed);
    atomic_store_explicit(&contended_now, left < cores, memory_order_relaxed);
}

/* Sample the others' use since the last sample (one caller at a time; the first only starts). */
static void sample_others(long now, int cores)
{
    static long seen_busy, seen_total, seen_own;
    /* The sampler that wins the exchange reads the seen_* the previous one wrote: that one stored
     * others_checked again (release) after them, and this load acquires it. */
    long t = atomic_load_explicit(&others_checked, memory_order_acquire);
    if ((t && now - t < OTHERS_CHECK_NS) || now < atomic_load_explicit(&others_held, memory_order_relaxed)
        || !atomic_compare_exchange_strong_explicit(&others_checked, &t, now, memory_order_acq_rel,
                                                    memory_order_relaxed))
        return;
    long busy, total;
    int ncpu;
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    long own = ts.tv_sec * 1000000000L + ts.tv_nsec;
    if (!cpu_ticks(&busy, &total, &ncpu))
        return;
    if (t && total > seen_total && cores) {
        /* ns of the cores' time per tick; the others' busy time over the wall time it spans. */
        static long tick_ns;
        if (!tick_ns)
            tick_ns = 1000000000L / sysconf(_SC_CLK_TCK);
        double wall = (double)(total - seen_total) * tick_ns / ncpu;
        note_others(((double)(busy - seen_busy) * tick_ns - (double)(own - seen_own)) / wall, cores);
    }
    seen_busy = busy;
    seen_total = total;
    seen_own = own;
    atomic_store_explicit(&others_checked, now, memory_order_release);
}

/* For tests: others < 0 forgets every sample (the next only starts); else record that other
 * processes used `others` cores of `cores`, and take no sample before `until` (monotonic ns).
 * Returns whether the pool holds the machine for contended, and the cores left. */
int le_pool_contention(long until, double others, int cores, int *left)
{
    if (others < 0) {
        atomic_store(&others_checked, 0);
        atomic_store(&others_held, 0);
        atomic_store(&cores_left, 0);
        atomic_store(&contended_now, 0);
    } else {
        atomic_store(&others_held, until);
        note_others(others, cores);
    }
    *left = atomic_load(&cores_left);
    return atomic_load(&contended_now);
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
    *contended = atomic_load_explicit(&contended_now, memory_order_relaxed);
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
        long start = le_now_ns();
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
                atomic_store_explicit(&polling[slot], 1, memory_order_relaxed);
            }
            long idle = le_now_ns() - start;
            if (atomic_load_explicit(&contended_now, memory_order_relaxed))
                idle = IDLE_YIELD_NS; /* sleep now: spinning takes a core another process wants */
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
    atomic_store(&others_checked, 0); /* its CPU time starts again at 0: the next sample only starts */
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
 * (above); unless the job is long with coarse steps, up to the cores other processes leave (above),
 * 1 when they leave one (counted as contended); 1 when the workers are
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
    sample_others(now, cores);
    int left = atomic_load_explicit(&cores_left, memory_order_relaxed);
    if (left && nth > left && (flops < CONTENDED_MIN_FLOPS || step_flops < CONTENDED_MIN_STEP_FLOPS)) {
        if (left <= 1)
            return count(LE_POOL_CONTENDED, 1);
        nth = left;
    }
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
