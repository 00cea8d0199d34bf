/* threadpool.h - internal: a small fork-join pool for the forward pass.
 *
 * n_threads-1 worker threads plus the calling thread run one job at a time. Workers poll
 * briefly for the next job (a short pause loop: jobs of one forward pass follow each other
 * within microseconds) and then sleep on a condition variable, because pure spinning
 * collapses on machines with as few vCPUs as threads (model-format §9).
 */
#ifndef BITNET_THREADPOOL_H
#define BITNET_THREADPOOL_H

#include <stdatomic.h>
#include <stdint.h>

typedef struct bn_pool bn_pool;

/* A job: fn(arg, ith, nth) runs on the caller (ith 0) and on every worker (ith 1..nth-1) that
 * joins before the caller's own call returns. Workers that have lost their CPU are not waited
 * for: fn must take its work from a shared queue, never assume that all nth threads run. */
typedef void (*bn_pool_fn)(void *arg, int32_t ith, int32_t nth);

/* NULL when a thread cannot be started (n_threads is clamped to 1..BN_POOL_MAX_THREADS). */
bn_pool *bn_pool_new(int32_t n_threads);
void bn_pool_free(bn_pool *p);
int32_t bn_pool_threads(const bn_pool *p);
/* Run a job and return when every call of fn has returned. */
void bn_pool_run(bn_pool *p, bn_pool_fn fn, void *arg);

#define BN_POOL_MAX_THREADS 256

/* A shared work counter: items [0, total) handed out in chunks to whichever thread asks. */
typedef struct {
    atomic_llong next;
    int64_t chunk;
    int64_t total;
} bn_queue;

/* About per_thread chunks per thread, each a multiple of align items. */
static inline void bn_queue_init(bn_queue *q, int64_t total, int32_t n_threads, int32_t per_thread,
                                 int32_t align)
{
    int64_t chunk = total / ((int64_t)n_threads * per_thread);
    chunk = (chunk + align - 1) / align * align;
    if (chunk < align)
        chunk = align;
    atomic_init(&q->next, 0);
    q->chunk = chunk;
    q->total = total;
}

/* The next chunk [*lo, *hi), or 0 when all are taken. */
static inline int bn_queue_grab(bn_queue *q, int64_t *lo, int64_t *hi)
{
    int64_t a = (int64_t)atomic_fetch_add_explicit(&q->next, 1, memory_order_relaxed) * q->chunk;
    if (a >= q->total)
        return 0;
    *lo = a;
    *hi = a + q->chunk < q->total ? a + q->chunk : q->total;
    return 1;
}

#endif
