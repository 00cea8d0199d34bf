/* threadpool.c - fork-join worker pool: brief polling, then a condition variable. */
#define _POSIX_C_SOURCE 200809L
#include "threadpool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define cpu_relax() _mm_pause()
#else
#define cpu_relax() ((void)0)
#endif

/* How long a thread polls before it sleeps. Jobs of one forward pass are separated by a few
 * microseconds of serial work; the gap between forward calls is much longer. */
#define SPIN_NS 30000

struct bn_pool {
    int32_t n_threads;
    pthread_t *threads;
    int32_t n_started;

    pthread_mutex_t mu;
    pthread_cond_t wake;    /* workers: a new generation (or stop) */
    pthread_cond_t done;    /* caller: active reached 0 */
    atomic_uint generation; /* bumped for every job */
    atomic_int open;        /* 1 while the current job admits workers */
    atomic_int active;      /* workers inside fn (or deciding whether to enter) */
    atomic_int stop;
    int waiting_caller; /* protected by mu */

    bn_pool_fn fn; /* current job, published before open is set */
    void *arg;
};

typedef struct {
    bn_pool *pool;
    int32_t ith;
} worker_arg;

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void leave(bn_pool *p)
{
    if (atomic_fetch_sub(&p->active, 1) == 1) {
        pthread_mutex_lock(&p->mu);
        if (p->waiting_caller)
            pthread_cond_signal(&p->done);
        pthread_mutex_unlock(&p->mu);
    }
}

static void *worker_main(void *opaque)
{
    worker_arg *wa = opaque;
    bn_pool *p = wa->pool;
    const int32_t ith = wa->ith;
    free(wa);
    unsigned seen = 0; /* the generation at creation: a job may be posted before we start */
    for (;;) {
        /* poll briefly, then sleep */
        unsigned g = atomic_load_explicit(&p->generation, memory_order_acquire);
        if (g == seen && !atomic_load_explicit(&p->stop, memory_order_acquire)) {
            int64_t t0 = now_ns();
            for (int i = 1;; i++) {
                cpu_relax();
                g = atomic_load_explicit(&p->generation, memory_order_acquire);
                if (g != seen || atomic_load_explicit(&p->stop, memory_order_acquire))
                    break;
                if ((i & 63) == 0 && now_ns() - t0 > SPIN_NS)
                    break;
            }
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            while ((g = atomic_load_explicit(&p->generation, memory_order_acquire)) == seen &&
                   !atomic_load_explicit(&p->stop, memory_order_acquire))
                pthread_cond_wait(&p->wake, &p->mu);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load_explicit(&p->stop, memory_order_acquire))
            return NULL;
        seen = g;
        /* Join unless the caller has already closed the job (it did all the work itself).
         * Sequentially consistent increment-then-check pairs with the caller's
         * close-then-check: either we see the job closed, or the caller sees us active. */
        atomic_fetch_add(&p->active, 1);
        if (atomic_load(&p->open))
            p->fn(p->arg, ith, p->n_threads);
        leave(p);
    }
}

bn_pool *bn_pool_new(int32_t n_threads)
{
    if (n_threads < 1)
        n_threads = 1;
    if (n_threads > BN_POOL_MAX_THREADS)
        n_threads = BN_POOL_MAX_THREADS;
    bn_pool *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->n_threads = n_threads;
    atomic_init(&p->generation, 0);
    atomic_init(&p->open, 0);
    atomic_init(&p->active, 0);
    atomic_init(&p->stop, 0);
    if (pthread_mutex_init(&p->mu, NULL) != 0) {
        free(p);
        return NULL;
    }
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    if (n_threads > 1) {
        p->threads = calloc((size_t)n_threads - 1, sizeof *p->threads);
        if (!p->threads) {
            bn_pool_free(p);
            return NULL;
        }
        for (int32_t i = 1; i < n_threads; i++) {
            worker_arg *wa = malloc(sizeof *wa);
            if (!wa) {
                bn_pool_free(p);
                return NULL;
            }
            wa->pool = p;
            wa->ith = i;
            if (pthread_create(&p->threads[i - 1], NULL, worker_main, wa) != 0) {
                free(wa);
                bn_pool_free(p);
                return NULL;
            }
            p->n_started++;
        }
    }
    return p;
}

void bn_pool_free(bn_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    atomic_store_explicit(&p->stop, 1, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int32_t i = 0; i < p->n_started; i++)
        pthread_join(p->threads[i], NULL);
    free(p->threads);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->done);
    pthread_mutex_destroy(&p->mu);
    free(p);
}

int32_t bn_pool_threads(const bn_pool *p)
{
    return p->n_threads;
}

void bn_pool_run(bn_pool *p, bn_pool_fn fn, void *arg)
{
    if (p->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->open, 1);
    /* The bump under the mutex pairs with the sleepers' check-then-wait; pollers see it
     * without the mutex. */
    pthread_mutex_lock(&p->mu);
    atomic_fetch_add(&p->generation, 1);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);

    fn(arg, 0, p->n_threads);

    atomic_store(&p->open, 0);
    if (atomic_load(&p->active) != 0) {
        int64_t t0 = now_ns();
        for (int i = 1; atomic_load(&p->active) != 0; i++) {
            cpu_relax();
            if ((i & 63) == 0 && now_ns() - t0 > SPIN_NS)
                break;
        }
    }
    if (atomic_load(&p->active) != 0) {
        pthread_mutex_lock(&p->mu);
        p->waiting_caller = 1;
        while (atomic_load(&p->active) != 0)
            pthread_cond_wait(&p->done, &p->mu);
        p->waiting_caller = 0;
        pthread_mutex_unlock(&p->mu);
    }
}
