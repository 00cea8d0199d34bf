/* dispatch.c - CPU detection, the choice of kernel set (bn_kernels, bn_kernel_select,
 * bn_kernel_name), the F16 row conversion used by the embedding lookup, and
 * bn_ternary_matmul, the test and benchmark entry point for one BitLinear.
 */
#define _GNU_SOURCE /* syscall() for the AMX permission request */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "../threadpool.h"

#ifdef BN_HAVE_AMX
#include <sys/syscall.h>
#include <unistd.h>
#endif

/* ------------------------------------------------------------------ CPU detection */
#ifdef BN_X86
static int cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

static int cpu_has_avx512vnni(void)
{
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
}

#ifdef BN_HAVE_AMX
/* The kernel asks Linux for the AMX register state once per process. */
static int amx_permitted(void)
{
    /* atomic: contexts on different threads may ask at once (the request is idempotent) */
    static atomic_int state; /* 0 unknown, 1 yes, -1 no */
    int st = atomic_load_explicit(&state, memory_order_relaxed);
    if (st == 0) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        int ok = __builtin_cpu_supports("avx512vnni") &&
                 syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
        st = ok ? 1 : -1;
        atomic_store_explicit(&state, st, memory_order_relaxed);
    }
    return st == 1;
}

static int cpu_has_amx(void)
{
    return cpu_has_avx512vnni() && __builtin_cpu_supports("amx-tile") &&
           __builtin_cpu_supports("amx-int8") && amx_permitted();
}
#endif /* BN_HAVE_AMX */
#endif /* BN_X86 */

/* ------------------------------------------------------------------ selection */

/* Atomic: contexts may run bn_forward on several threads (each calls bn_kernels), and
 * bn_kernel_select may come from yet another; a plain pointer would be a data race. */
static _Atomic(const bn_kernel_set *) selected;

const bn_kernel_set *bn_kernels_by_name(const char *name)
{
    if (!name)
        return NULL;
    if (strcmp(name, "scalar") == 0)
        return &bn_kernels_scalar;
#ifdef BN_X86
    if (strcmp(name, "avx2") == 0)
        return cpu_has_avx2() ? &bn_kernels_avx2 : NULL;
    if (strcmp(name, "avx512vnni") == 0)
        return cpu_has_avx512vnni() ? &bn_kernels_avx512 : NULL;
#ifdef BN_HAVE_AMX
    if (strcmp(name, "amx") == 0)
        return cpu_has_amx() ? &bn_kernels_amx : NULL;
#endif
#endif
    return NULL;
}

static const bn_kernel_set *best_kernels(void)
{
#ifdef BN_X86
#ifdef BN_HAVE_AMX
    if (cpu_has_amx())
        return &bn_kernels_amx;
#endif
    if (cpu_has_avx512vnni())
        return &bn_kernels_avx512;
    if (cpu_has_avx2())
        return &bn_kernels_avx2;
#endif
    return &bn_kernels_scalar;
}

const bn_kernel_set *bn_kernels(void)
{
    /* Every thread computes the same answer, so a lost first-use race is harmless. */
    const bn_kernel_set *k = atomic_load_explicit(&selected, memory_order_relaxed);
    if (!k) {
        k = best_kernels();
        atomic_store_explicit(&selected, k, memory_order_relaxed);
    }
    return k;
}

const char *bn_kernel_name(void)
{
    return bn_kernels()->name;
}

int bn_kernel_select(const char *name)
{
    const bn_kernel_set *k = bn_kernels_by_name(name);
    if (!k)
        return -1;
    atomic_store_explicit(&selected, k, memory_order_relaxed);
    return 0;
}

void bn_f16_row_to_f32(const uint16_t *src, int32_t n, float *dst)
{
#ifdef BN_X86
    if (bn_kernels() != &bn_kernels_scalar) {
        bn_f16_row_avx2(src, n, dst);
        return;
    }
#endif
    for (int32_t i = 0; i < n; i++)
        dst[i] = bn_f16_to_f32(src[i]);
}

/* ------------------------------------------------------------------ bn_ternary_matmul */

typedef struct {
    const bn_kernel_set *k;
    const bn_ternary *w;
    const bn_qact *a;
    float *y;
    bn_queue queue;
} matmul_job;

static void matmul_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)ith;
    (void)nth;
    matmul_job *job = arg;
    int64_t lo, hi;
    while (bn_queue_grab(&job->queue, &lo, &hi))
        bn_weights_rows(job->k, job->w, (int32_t)lo, (int32_t)hi, job->a, job->y, job->w->n_out);
}

static int weights_matmul(const char *kernel, const uint8_t *packed, float scale, uint8_t fmt,
                          int32_t n_in, int32_t n_out, const float *x, int32_t n_tok, float *y,
                          int32_t n_threads)
{
    const bn_kernel_set *k = kernel ? bn_kernels_by_name(kernel) : bn_kernels();
    /* n_in <= 2^22 keeps every int32 accumulator exact for any codes and inputs (3 * 128 *
     * 2^22 < 2^31, also per lane of the masked AVX-512 planes), as bn_context_new's n_ff bound. */
    if (!k || !packed || !x || !y || n_in <= 0 || n_in % (fmt == BN_WFMT_Q2_0 ? 64 : 128) != 0 ||
        n_out <= 0 || n_tok <= 0 || n_in > (1 << 22) || n_threads < 1)
        return -1;
    const int32_t stride = (n_in + 127) / 128 * 128; /* a multiple of 128 */
    int8_t *q = aligned_alloc(64, (size_t)n_tok * (size_t)stride);
    float *s = malloc((size_t)n_tok * sizeof *s);
    int32_t *qsum = malloc((size_t)n_tok * sizeof *qsum);
    int8_t *tiles = aligned_alloc(64, (size_t)n_tok * (size_t)stride);
    bn_pool *pool = bn_pool_new(n_threads);
    int rc = -1;
    if (q && s && qsum && tiles && pool) {
        for (int32_t t = 0; t < n_tok; t++)
            bn_quantizer(k, fmt)(x + (size_t)t * n_in, n_in, q + (size_t)t * stride, &s[t],
                                 &qsum[t]);
        if (bn_uses_tiles(k, fmt))
            k->prepare(q, stride, n_in, n_tok, tiles);
        bn_ternary w = {packed, scale, n_in, n_out, fmt};
        bn_qact a = {q, stride, n_tok, s, qsum, bn_uses_tiles(k, fmt) ? tiles : NULL};
        matmul_job job = {k, &w, &a, y, {0}};
        bn_queue_init(&job.queue, n_out, n_threads, 3, 4);
        bn_pool_run(pool, matmul_worker, &job);
        rc = 0;
    }
    bn_pool_free(pool);
    free(tiles);
    free(qsum);
    free(s);
    free(q);
    return rc;
}

int bn_ternary_matmul(const char *kernel, const uint8_t *packed, float scale, int32_t n_in,
                      int32_t n_out, const float *x, int32_t n_tok, float *y, int32_t n_threads)
{
    return weights_matmul(kernel, packed, scale, BN_WFMT_I2_S, n_in, n_out, x, n_tok, y, n_threads);
}

int bn_q2_0_matmul(const char *kernel, const uint8_t *blocks, int32_t n_in, int32_t n_out,
                   const float *x, int32_t n_tok, float *y, int32_t n_threads)
{
    return weights_matmul(kernel, blocks, 0.0f, BN_WFMT_Q2_0, n_in, n_out, x, n_tok, y, n_threads);
}

/* ------------------------------------------------------------------ bn_q8_0_matmul */

typedef struct {
    const bn_kernel_set *k;
    const uint8_t *w;
    int32_t n_in, n_out, n_tok;
    const float *x;
    float *y;
    bn_queue queue;
} q8_0_job;

static void q8_0_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)ith;
    (void)nth;
    q8_0_job *job = arg;
    int64_t lo, hi;
    while (bn_queue_grab(&job->queue, &lo, &hi))
        job->k->q8_0_matmul(job->w, job->n_in, (int32_t)lo, (int32_t)hi, job->x, job->n_tok,
                            job->n_in, job->y, job->n_out);
}

int bn_q8_0_matmul(const char *kernel, const uint8_t *blocks, int32_t n_in, int32_t n_out,
                   const float *x, int32_t n_tok, float *y, int32_t n_threads)
{
    const bn_kernel_set *k = kernel ? bn_kernels_by_name(kernel) : bn_kernels();
    /* n_in <= 2^20 as the model's n_embd (bn_context_new); y holds n_tok * n_out floats */
    if (!k || !blocks || !x || !y || n_in <= 0 || n_in % 32 != 0 || n_in > (1 << 20) ||
        n_out <= 0 || n_tok <= 0 || n_threads < 1 || (int64_t)n_tok * n_out > INT32_MAX)
        return -1;
    bn_pool *pool = bn_pool_new(n_threads);
    if (!pool)
        return -1;
    q8_0_job job = {k, blocks, n_in, n_out, n_tok, x, y, {0}};
    /* the head's split (forward.c) */
    bn_queue_init(&job.queue, n_out, n_threads, 4, 16);
    bn_pool_run(pool, q8_0_worker, &job);
    bn_pool_free(pool);
    return 0;
}
