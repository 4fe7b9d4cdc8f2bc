/* The engine's worker pool: threads started on first use and reused, a job handed to the workers
 * that are on a core at that moment, a sense-reversing barrier that notices a thread which lost its
 * core, and idle workers that spin briefly, then yield, then sleep on a condition variable. */
#define _GNU_SOURCE
#include "_cpu_impl.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <string.h>
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
 * Back-to-back streaming calls and the next layer of a step find it spinning. A job is given only
 * to workers spinning tightly, known to be on a core: one that yields or sleeps may take
 * milliseconds to come back on a busy machine, so that call runs on one thread and the worker,
 * poked, spins tightly for the next. */
#define IDLE_PAUSE_NS 20000L
#define IDLE_YIELD_NS 500000L
/* A wait at a step's barrier longer than this, and than twice the waiting thread's own work for
 * the step, means a thread of the job lost its core to another process. Short steps (streaming)
 * then finish the call on one thread and run alone for a while, backing off from 1 ms to 1 s,
 * instead of stalling every step for a scheduler tick; long steps (big batches) just wait, a
 * lost tick being small next to them. Spinning yields the core past STALL_NS. */
#define STALL_NS 50000L
#define SOLO_NS_MIN 1000000L
#define SOLO_NS_MAX 1000000000L

static struct {
    pthread_mutex_t busy;  /* held by the one caller that has the workers; others run alone */
    pthread_mutex_t lock;
    pthread_cond_t wake;
    int started;           /* workers running: tids 1..started */
    atomic_uint generation;
    atomic_int done;
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

static unsigned start_generation[MAX_THREADS];

static atomic_int stalled;          /* a wait of the current job counted as a stall */
static _Atomic long solo_until;     /* calls start on one thread until then (now_ns) */
static _Atomic long solo_backoff = SOLO_NS_MIN;

/* Wait until cond(arg) holds: spin, then yield the core once the wait passes STALL_NS; a wait
 * past stall_ns (0: never) marks the job as stalled. */
static void wait_for(int (*cond)(void *), void *arg, long stall_ns)
{
    long start = 0;
    int spins = 0, noted = 0;
    while (!cond(arg)) {
        cpu_relax();
        if ((++spins & 63) == 0) {
            long t = le_now_ns();
            if (!start)
                start = t;
            if (t - start > STALL_NS) {
                if (stall_ns && !noted && t - start > stall_ns) {
                    atomic_store_explicit(&stalled, 1, memory_order_relaxed);
                    noted = 1;
                }
                sched_yield();
            }
        }
    }
}

typedef struct {
    barrier_t *b;
    int s;
} sense_wait;

static int sense_flipped(void *p)
{
    sense_wait *w = p;
    return atomic_load_explicit(&w->b->sense, memory_order_acquire) == w->s;
}

void le_barrier_wait(barrier_t *b, int *local_sense, long work_ns)
{
    int s = !*local_sense;
    *local_sense = s;
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == b->n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        if (atomic_load_explicit(&stalled, memory_order_relaxed))
            atomic_store_explicit(&b->solo, 1, memory_order_relaxed);
        atomic_store_explicit(&b->sense, s, memory_order_release);
        return;
    }
    sense_wait w = {b, s};
    wait_for(sense_flipped, &w, work_ns > STALL_NS / 2 ? 2 * work_ns : STALL_NS);
}

static atomic_int polling[MAX_THREADS]; /* worker tid spins tightly: it is on a core, now */
static atomic_uint pokes;               /* bumped to wake the workers without a job */

static void *worker_main(void *p)
{
    int tid = (int)(ptrdiff_t)p;
    /* The generation when this worker was made: the job that made it comes after. */
    unsigned seen = start_generation[tid];
    for (;;) {
        long start = le_now_ns();
        unsigned poked = atomic_load_explicit(&pokes, memory_order_relaxed);
        int spins = 0;
        atomic_store_explicit(&polling[tid], 1, memory_order_relaxed);
        while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen) {
            if ((++spins & 63) != 0) {
                cpu_relax();
                continue;
            }
            if (atomic_load_explicit(&pokes, memory_order_relaxed) != poked) {
                /* A caller found us away and ran alone: spin tightly again for the next job. */
                poked = atomic_load_explicit(&pokes, memory_order_relaxed);
                start = le_now_ns();
                atomic_store_explicit(&polling[tid], 1, memory_order_relaxed);
            }
            long idle = le_now_ns() - start;
            if (idle < IDLE_PAUSE_NS) {
                cpu_relax();
            } else if (idle < IDLE_YIELD_NS) {
                atomic_store_explicit(&polling[tid], 0, memory_order_relaxed);
                sched_yield();
            } else {
                pthread_mutex_lock(&pool.lock);
                while (atomic_load_explicit(&pool.generation, memory_order_acquire) == seen
                       && atomic_load_explicit(&pokes, memory_order_relaxed) == poked)
                    pthread_cond_wait(&pool.wake, &pool.lock);
                pthread_mutex_unlock(&pool.lock);
                poked = atomic_load_explicit(&pokes, memory_order_relaxed);
                start = le_now_ns();
                atomic_store_explicit(&polling[tid], 1, memory_order_relaxed);
            }
        }
        atomic_store_explicit(&polling[tid], 0, memory_order_relaxed);
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (tid < pool.nth) {
            pool.fn(pool.arg, tid, pool.nth);
            atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
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
    for (int tid = 0; tid < MAX_THREADS; tid++)
        atomic_store(&polling[tid], 0);
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;
static void register_fork(void) { pthread_atfork(NULL, NULL, pool_after_fork); }

/* The number of threads a job may use, up to nth: 1 when the workers are busy with another
 * caller's job (so two sessions stepping at once each keep one core), or, unless the job is
 * patient (long), when a worker is not spinning on a core. Above 1 the workers are reserved for
 * this caller until pool_run. */
int le_pool_acquire(int nth, int patient)
{
    if (nth > MAX_THREADS)
        nth = MAX_THREADS;
    if (nth <= 1)
        return 1;
    if (le_now_ns() < atomic_load_explicit(&solo_until, memory_order_relaxed))
        return 1;
    if (pthread_mutex_trylock(&pool.busy) != 0)
        return 1;
    pthread_once(&fork_once, register_fork);
    while (pool.started < nth - 1) {
        pthread_t t;
        pthread_attr_t attr;
        int tid = pool.started + 1;
        start_generation[tid] = atomic_load(&pool.generation);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, worker_main, (void *)(ptrdiff_t)tid);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        pool.started = tid;
    }
    if (nth > pool.started + 1)
        nth = pool.started + 1;
    int away = 0;
    for (int tid = 1; tid < nth; tid++)
        away |= !atomic_load_explicit(&polling[tid], memory_order_relaxed);
    if (away && !patient) {
        pthread_mutex_lock(&pool.lock);
        atomic_fetch_add_explicit(&pokes, 1, memory_order_relaxed);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.lock);
        nth = 1;
    }
    if (nth <= 1)
        pthread_mutex_unlock(&pool.busy);
    return nth;
}

static int workers_done(void *nth)
{
    return atomic_load_explicit(&pool.done, memory_order_acquire) == *(int *)nth - 1;
}

/* Run fn on nth threads as pool_acquire granted them; the caller is tid 0. */
void le_pool_run(job_fn fn, void *arg, int nth)
{
    if (nth <= 1) {
        fn(arg, 0, 1);
        return;
    }
    pool.fn = fn;
    pool.arg = arg;
    pool.nth = nth;
    atomic_store_explicit(&stalled, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    pthread_mutex_lock(&pool.lock);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    fn(arg, 0, nth);
    wait_for(workers_done, &nth, 0);
    if (atomic_load_explicit(&stalled, memory_order_relaxed)) {
        long backoff = atomic_load_explicit(&solo_backoff, memory_order_relaxed);
        atomic_store_explicit(&solo_until, le_now_ns() + backoff, memory_order_relaxed);
        atomic_store_explicit(&solo_backoff, backoff < SOLO_NS_MAX ? 2 * backoff : backoff, memory_order_relaxed);
    } else {
        atomic_store_explicit(&solo_backoff, SOLO_NS_MIN, memory_order_relaxed);
    }
    pthread_mutex_unlock(&pool.busy);
}


void le_barrier_init(barrier_t *b, int n)
{
    atomic_init(&b->count, 0);
    atomic_init(&b->sense, 0);
    atomic_init(&b->solo, 0);
    b->n = n;
}
