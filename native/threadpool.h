/* threadpool.h - internal: a small fork-join pool for the forward pass.
 *
 * n_threads-1 worker threads plus the calling thread run one job at a time. Workers poll
 * briefly for the next job (a short pause loop: jobs of one forward pass follow each other
 * within microseconds) and then sleep on a condition variable, because pure spinning
 * collapses on machines with as few vCPUs as threads (spec section 9).
 */
#ifndef BITNET_THREADPOOL_H
#define BITNET_THREADPOOL_H

#include <stdint.h>

typedef struct bn_pool bn_pool;

/* fn(arg, ith, nth) is called once for every ith in 0..nth-1, each on its own thread
 * (ith 0 on the caller). */
typedef void (*bn_pool_fn)(void *arg, int32_t ith, int32_t nth);

/* NULL when a thread cannot be started (n_threads is clamped to 1..BN_POOL_MAX_THREADS). */
bn_pool *bn_pool_new(int32_t n_threads);
void bn_pool_free(bn_pool *p);
int32_t bn_pool_threads(const bn_pool *p);
/* Run fn on every thread of the pool and return when all calls have returned. */
void bn_pool_run(bn_pool *p, bn_pool_fn fn, void *arg);

#define BN_POOL_MAX_THREADS 256

/* The share [*lo, *hi) of n items for thread ith of nth, boundaries multiples of align
 * (except n itself), as even as the alignment allows. */
void bn_split_range(int64_t n, int64_t align, int32_t ith, int32_t nth, int64_t *lo, int64_t *hi);

#endif
