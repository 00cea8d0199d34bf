/* bandwidth.c - the memory read bandwidth probe (bn_measure_read_bandwidth, bn_bwprobe_*):
 * how fast this machine can stream bytes, the limit of decode speed (model-format §9).
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bitnet.h"
#include "threadpool.h"

typedef struct {
    const uint8_t *buf;
    size_t n;
    int32_t streams;
    bn_queue queue; /* in 1 MiB pieces */
    uint64_t sink[BN_POOL_MAX_THREADS];
} read_job;

typedef long long bn_v4i64 __attribute__((vector_size(32)));

static void read_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)nth;
    read_job *job = arg;
    int64_t lo, hi;
    bn_v4i64 acc[8] = {{0}}; /* one chain per stream (mod 8): loads stay independent */
    while (bn_queue_grab(&job->queue, &lo, &hi)) {
        const size_t lines = (size_t)(hi - lo) * 16384 / (size_t)job->streams;
        const uint8_t *base = job->buf + (size_t)lo * (1 << 20);
        for (size_t i = 0; i < lines; i++)
            for (int32_t s = 0; s < job->streams; s++) {
                const uint8_t *p = base + ((size_t)s * lines + i) * 64;
                bn_v4i64 v0, v1;
                memcpy(&v0, p, 32);
                memcpy(&v1, p + 32, 32);
                acc[s & 7] ^= v0 ^ v1;
            }
    }
    uint64_t sink = 0;
    for (int s = 0; s < 8; s++)
        for (int l = 0; l < 4; l++)
            sink ^= (uint64_t)acc[s][l];
    job->sink[ith] = sink;
}

struct bn_bwprobe {
    uint8_t *buf;
    bn_pool *pool;
    read_job job;
    int32_t n_threads;
};

void bn_bwprobe_free(bn_bwprobe *p)
{
    if (!p)
        return;
    bn_pool_free(p->pool);
    free(p->buf);
    free(p);
}

bn_bwprobe *bn_bwprobe_new(uint64_t n_bytes, int32_t n_threads)
{
    if (n_bytes < ((uint64_t)1 << 24) || n_bytes > ((uint64_t)1 << 40) || n_threads < 1 ||
        n_threads > BN_POOL_MAX_THREADS)
        return NULL;
    bn_bwprobe *p = calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->buf = malloc((size_t)n_bytes);
    p->pool = bn_pool_new(n_threads);
    if (!p->buf || !p->pool) {
        bn_bwprobe_free(p);
        return NULL;
    }
    memset(p->buf, 1, (size_t)n_bytes); /* fault every page in before timing */
    p->job.buf = p->buf;
    p->job.n = (size_t)n_bytes;
    p->n_threads = n_threads;
    return p;
}

double bn_bwprobe_run(bn_bwprobe *p, int32_t streams)
{
    if (!p || streams < 1 || streams > 64)
        return -1.0;
    p->job.streams = streams;
    /* about 4 chunks per thread, whole MiBs each, each read as `streams` streams */
    bn_queue_init(&p->job.queue, (int64_t)(p->job.n >> 20), p->n_threads, 4, 1);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    bn_pool_run(p->pool, read_worker, &p->job);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double dt = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return dt > 0 ? (double)((p->job.n >> 20) << 20) / dt / 1e9 : -1.0;
}

double bn_measure_read_bandwidth(uint64_t n_bytes, int32_t n_threads, int32_t streams, int32_t reps)
{
    if (reps < 1)
        return -1.0;
    bn_bwprobe *p = bn_bwprobe_new(n_bytes, n_threads);
    double best = -1.0;
    for (int32_t r = 0; p && r < reps; r++) {
        double v = bn_bwprobe_run(p, streams);
        if (v > best)
            best = v;
    }
    bn_bwprobe_free(p);
    return best;
}
