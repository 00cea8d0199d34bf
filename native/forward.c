/* forward.c - contexts, KV caches and the batched forward pass (spec section 5).
 *
 * bn_forward concatenates the tokens of every entry into one activation matrix and runs each
 * layer once for all of them, so every weight byte read from memory serves the whole batch.
 * Each token's arithmetic is independent of the other tokens and of the thread count: the
 * matrix kernels compute every output on its own in a fixed order (kernels.h), and the
 * per-token steps below (norms, RoPE, attention) run one token at a time in a fixed order.
 * So a sequence gets bit-identical logits whatever else is in the batch.
 *
 * Everything is allocated in bn_context_new; bn_forward only grows the logits buffer when a
 * call asks for more logits rows than ever before (before any state changes).
 */
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet.h"
#include "error.h"
#include "kernels.h"
#include "model.h"
#include "threadpool.h"

/* Largest number of tokens one internal step processes; longer calls run in chunks. */
#define BN_MAX_CHUNK 512

struct bn_cancel {
    atomic_int flag;
};

bn_cancel *bn_cancel_new(void)
{
    bn_cancel *c = malloc(sizeof *c);
    if (c)
        atomic_init(&c->flag, 0);
    return c;
}

void bn_cancel_free(bn_cancel *c)
{
    free(c);
}

void bn_cancel_set(bn_cancel *c)
{
    if (c)
        atomic_store_explicit(&c->flag, 1, memory_order_release);
}

void bn_cancel_clear(bn_cancel *c)
{
    if (c)
        atomic_store_explicit(&c->flag, 0, memory_order_release);
}

int bn_cancel_is_set(const bn_cancel *c)
{
    return c ? atomic_load_explicit(&((bn_cancel *)c)->flag, memory_order_acquire) : 0;
}

/* Per-entry bookkeeping of the last bn_forward call. */
typedef struct {
    int32_t mode;       /* BN_LOGITS_* */
    int32_t n_tokens;
    int32_t done;       /* tokens processed so far */
    int32_t orig_pos;   /* slot position before the call */
    int64_t base_row;   /* first logits row, -1 if none yet */
    int32_t status;
} entry_state;

struct bn_context {
    const bn_model *m;
    bn_hparams hp;
    int32_t n_slots, n_ctx, max_chunk;
    int32_t kv_dim, n_wide;     /* n_head_kv*head_dim, max(n_embd, n_ff) */
    bn_pool *pool;

    float *kcache, *vcache;     /* [slot][layer][n_ctx][kv_dim] */
    int32_t *pos;               /* per slot */
    float *rope_cos, *rope_sin; /* [n_ctx][head_dim/2] */

    /* chunk scratch, max_chunk token rows each */
    float *x, *h, *q, *k, *v, *att, *g, *u, *tmp, *ynorm;
    int8_t *qa;                 /* [T][n_wide] quantized activations */
    int8_t *qa_tiles;           /* [T][n_wide] the same, rearranged by the kernel's prepare */
    float *qa_s;
    int32_t *qa_sum;
    int32_t *tok_slot, *tok_pos, *tok_id, *tok_row; /* tok_row: logits row or -1 */
    float *scores;              /* [n_threads][group][n_ctx] attention scratch */
    size_t scores_per_thread;   /* group * n_ctx, group = n_head / n_head_kv */

    float *logits;              /* [logits_cap][n_vocab] */
    int64_t logits_cap;
    entry_state *ents;          /* [n_slots] (entries are distinct slots) */
    int32_t n_ents;             /* entries of the last successful bn_forward */
    int32_t *slot_seen;         /* [n_slots] duplicate detection stamps */
    int32_t stamp;
};

static void *alloc_array(size_t n, size_t size, int *failed)
{
    if (n == 0)
        n = 1;
    if (n > SIZE_MAX / size) {
        *failed = 1;
        return NULL;
    }
    void *p = malloc(n * size);  /* large blocks come zeroed from mmap and stay untouched */
    if (!p)
        *failed = 1;
    return p;
}

void bn_context_free(bn_context *ctx)
{
    if (!ctx)
        return;
    bn_pool_free(ctx->pool);
    free(ctx->kcache);
    free(ctx->vcache);
    free(ctx->pos);
    free(ctx->rope_cos);
    free(ctx->rope_sin);
    free(ctx->x);
    free(ctx->h);
    free(ctx->q);
    free(ctx->k);
    free(ctx->v);
    free(ctx->att);
    free(ctx->g);
    free(ctx->u);
    free(ctx->tmp);
    free(ctx->ynorm);
    free(ctx->qa);
    free(ctx->qa_tiles);
    free(ctx->qa_s);
    free(ctx->qa_sum);
    free(ctx->tok_slot);
    free(ctx->tok_pos);
    free(ctx->tok_id);
    free(ctx->tok_row);
    free(ctx->scores);
    free(ctx->logits);
    free(ctx->ents);
    free(ctx->slot_seen);
    free(ctx);
}

static int check_matrix(const bn_ternary *w, int32_t n_in, int32_t n_out, const char *what,
                        int32_t layer, char *err, size_t errlen)
{
    if (!w->codes || w->n_in != n_in || w->n_out != n_out || n_in % 128 != 0) {
        bn_set_err(err, errlen, "layer %d %s: shape %d x %d, expected %d x %d", layer, what,
                w->n_out, w->n_in, n_out, n_in);
        return -1;
    }
    return 0;
}

bn_context *bn_context_new(const bn_model *m, int32_t n_slots, int32_t n_ctx, int32_t n_threads,
                           char *err, size_t errlen)
{
    if (!m) {
        bn_set_err(err, errlen, "no model");
        return NULL;
    }
    const bn_hparams *hp = &m->hp;
    if (n_ctx <= 0)
        n_ctx = hp->n_ctx_train;
    if (n_slots < 1 || n_slots > 4096) {
        bn_set_err(err, errlen, "n_slots %d out of range 1..4096", n_slots);
        return NULL;
    }
    if (n_ctx < 1 || n_ctx > (1 << 20)) {
        bn_set_err(err, errlen, "n_ctx %d out of range 1..%d", n_ctx, 1 << 20);
        return NULL;
    }
    if (n_threads < 1 || n_threads > BN_POOL_MAX_THREADS) {
        bn_set_err(err, errlen, "n_threads %d out of range 1..%d", n_threads, BN_POOL_MAX_THREADS);
        return NULL;
    }
    const int32_t E = hp->n_embd, F = hp->n_ff, H = hp->n_head, Hkv = hp->n_head_kv,
                  D = hp->head_dim;
    if (E <= 0 || E % 128 != 0 || F <= 0 || F % 128 != 0 || H <= 0 || Hkv <= 0 ||
        H % Hkv != 0 || H / Hkv > 64 || D <= 0 || D % 2 != 0 || (int64_t)D * H != E ||
        hp->n_layer <= 0 || hp->n_vocab <= 0 || E > (1 << 20) || F > (1 << 22)) {
        bn_set_err(err, errlen, "unsupported model dimensions (n_embd %d, n_ff %d, n_head %d, "
                "n_head_kv %d, head_dim %d)", E, F, H, Hkv, D);
        return NULL;
    }
    if (!m->tok_embd || !m->head || !m->output_norm || !m->layers) {
        bn_set_err(err, errlen, "model is missing tensors");
        return NULL;
    }
    for (int32_t l = 0; l < hp->n_layer; l++) {
        const bn_layer *L = &m->layers[l];
        if (check_matrix(&L->wq, E, E, "attn_q", l, err, errlen) ||
            check_matrix(&L->wk, E, Hkv * D, "attn_k", l, err, errlen) ||
            check_matrix(&L->wv, E, Hkv * D, "attn_v", l, err, errlen) ||
            check_matrix(&L->wo, E, E, "attn_output", l, err, errlen) ||
            check_matrix(&L->w_gate, E, F, "ffn_gate", l, err, errlen) ||
            check_matrix(&L->w_up, E, F, "ffn_up", l, err, errlen) ||
            check_matrix(&L->w_down, F, E, "ffn_down", l, err, errlen))
            return NULL;
        if (!L->attn_norm || !L->attn_sub_norm || !L->ffn_norm || !L->ffn_sub_norm) {
            bn_set_err(err, errlen, "layer %d: missing norm weights", l);
            return NULL;
        }
    }

    bn_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        bn_set_err(err, errlen, "out of memory");
        return NULL;
    }
    ctx->m = m;
    ctx->hp = *hp;
    ctx->n_slots = n_slots;
    ctx->n_ctx = n_ctx;
    ctx->kv_dim = Hkv * D;
    ctx->n_wide = E > F ? E : F;
    int64_t total_positions = (int64_t)n_slots * n_ctx;
    ctx->max_chunk = total_positions < BN_MAX_CHUNK ? (int32_t)total_positions : BN_MAX_CHUNK;

    int failed = 0;
    const size_t T = (size_t)ctx->max_chunk;
    const size_t cache_n = (size_t)n_slots * (size_t)hp->n_layer * (size_t)n_ctx;
    if (cache_n > SIZE_MAX / (size_t)ctx->kv_dim)
        failed = 1;
    else {
        ctx->kcache = alloc_array(cache_n * (size_t)ctx->kv_dim, sizeof(float), &failed);
        ctx->vcache = alloc_array(cache_n * (size_t)ctx->kv_dim, sizeof(float), &failed);
    }
    ctx->pos = calloc((size_t)n_slots, sizeof *ctx->pos);
    if (!ctx->pos)
        failed = 1;
    ctx->rope_cos = alloc_array((size_t)n_ctx * (size_t)(D / 2), sizeof(float), &failed);
    ctx->rope_sin = alloc_array((size_t)n_ctx * (size_t)(D / 2), sizeof(float), &failed);
    ctx->x = alloc_array(T * (size_t)E, sizeof(float), &failed);
    ctx->h = alloc_array(T * (size_t)ctx->n_wide, sizeof(float), &failed);
    ctx->q = alloc_array(T * (size_t)E, sizeof(float), &failed);
    ctx->k = alloc_array(T * (size_t)ctx->kv_dim, sizeof(float), &failed);
    ctx->v = alloc_array(T * (size_t)ctx->kv_dim, sizeof(float), &failed);
    ctx->att = alloc_array(T * (size_t)E, sizeof(float), &failed);
    ctx->g = alloc_array(T * (size_t)F, sizeof(float), &failed);
    ctx->u = alloc_array(T * (size_t)F, sizeof(float), &failed);
    ctx->tmp = alloc_array(T * (size_t)E, sizeof(float), &failed);
    ctx->ynorm = alloc_array(T * (size_t)E, sizeof(float), &failed);
    ctx->qa = alloc_array(T * (size_t)ctx->n_wide, 1, &failed);
    ctx->qa_tiles = alloc_array(T * (size_t)ctx->n_wide, 1, &failed);
    ctx->qa_s = alloc_array(T, sizeof(float), &failed);
    ctx->qa_sum = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_slot = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_pos = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_id = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_row = alloc_array(T, sizeof(int32_t), &failed);
    ctx->scores_per_thread = (size_t)(H / Hkv) * (size_t)n_ctx;
    ctx->scores = alloc_array((size_t)n_threads * ctx->scores_per_thread, sizeof(float), &failed);
    ctx->logits_cap = n_slots;
    ctx->logits = alloc_array((size_t)n_slots * (size_t)hp->n_vocab, sizeof(float), &failed);
    ctx->ents = alloc_array((size_t)n_slots, sizeof(entry_state), &failed);
    ctx->slot_seen = calloc((size_t)n_slots, sizeof(int32_t));
    if (!ctx->slot_seen)
        failed = 1;
    if (failed) {
        bn_set_err(err, errlen, "out of memory allocating a context of %d slots x %d positions",
                n_slots, n_ctx);
        bn_context_free(ctx);
        return NULL;
    }
    ctx->pool = bn_pool_new(n_threads);
    if (!ctx->pool) {
        bn_set_err(err, errlen, "cannot start %d threads", n_threads);
        bn_context_free(ctx);
        return NULL;
    }
    /* RoPE angles pos * base^(-2i/D), computed in double once */
    for (int32_t p = 0; p < n_ctx; p++)
        for (int32_t i = 0; i < D / 2; i++) {
            double theta = (double)p * pow((double)hp->rope_base, -2.0 * i / D);
            ctx->rope_cos[(size_t)p * (D / 2) + i] = (float)cos(theta);
            ctx->rope_sin[(size_t)p * (D / 2) + i] = (float)sin(theta);
        }
    return ctx;
}

int bn_context_set_threads(bn_context *ctx, int32_t n_threads)
{
    if (!ctx || n_threads < 1 || n_threads > BN_POOL_MAX_THREADS)
        return -1;
    if (n_threads == bn_pool_threads(ctx->pool))
        return 0;
    int failed = 0;
    float *scores = alloc_array((size_t)n_threads * ctx->scores_per_thread, sizeof(float), &failed);
    if (failed)
        return -1;
    bn_pool *pool = bn_pool_new(n_threads);
    if (!pool) {
        free(scores);
        return -1;
    }
    bn_pool_free(ctx->pool);
    free(ctx->scores);
    ctx->pool = pool;
    ctx->scores = scores;
    return 0;
}

int32_t bn_context_n_ctx(const bn_context *ctx)
{
    return ctx ? ctx->n_ctx : 0;
}

int32_t bn_context_n_slots(const bn_context *ctx)
{
    return ctx ? ctx->n_slots : 0;
}

void bn_seq_reset(bn_context *ctx, int32_t slot)
{
    if (ctx && slot >= 0 && slot < ctx->n_slots)
        ctx->pos[slot] = 0;
}

int bn_seq_truncate(bn_context *ctx, int32_t slot, int32_t pos)
{
    if (!ctx || slot < 0 || slot >= ctx->n_slots || pos < 0 || pos > ctx->pos[slot])
        return -1;
    ctx->pos[slot] = pos;
    return 0;
}

int32_t bn_seq_pos(const bn_context *ctx, int32_t slot)
{
    if (!ctx || slot < 0 || slot >= ctx->n_slots)
        return -1;
    return ctx->pos[slot];
}

/* ------------------------------------------------------------------ per-token math */

/* GCC vector types: elementwise arithmetic in the written order (no contraction in ISO C
 * mode), lowered to whatever vector width the function is compiled for. */
typedef float bn_v8f __attribute__((vector_size(32)));
typedef float bn_v16f __attribute__((vector_size(64)));

/* Sum of a[i]*b[i] in a fixed order: 8 partial sums, then a fixed tree. */
static inline __attribute__((always_inline)) float dot_fixed(const float *a, const float *b,
                                                              int32_t n)
{
    bn_v8f p = {0};
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        bn_v8f x, y;
        memcpy(&x, a + i, sizeof x);
        memcpy(&y, b + i, sizeof y);
        p += x * y;
    }
    for (; i < n; i++)
        p[0] += a[i] * b[i];
    float s4[4];
    for (int l = 0; l < 4; l++)
        s4[l] = p[l] + p[l + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

static void rmsnorm(const float *x, const float *w, int32_t n, float eps, float *out)
{
    float ss = dot_fixed(x, x, n);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int32_t i = 0; i < n; i++)
        out[i] = w[i] * (x[i] * r);
}

/* x += y (the residual stream); restrict lets the compiler vectorize */
static void add_rows(float *restrict x, const float *restrict y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* g = max(g, 0)^2 * u (squared ReLU gate) */
static void relu_sq_mul(float *restrict g, const float *restrict u, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        /* max(v, 0) on the bits: a set sign bit clears the word. Integer ops vectorize where
         * a float comparison (which may trap) does not. */
        uint32_t b;
        memcpy(&b, &g[i], sizeof b);
        b &= ~(uint32_t)((int32_t)b >> 31);
        float gv;
        memcpy(&gv, &b, sizeof gv);
        g[i] = gv * gv * u[i];
    }
}

static void rope(float *v, int32_t n_heads, int32_t D, const float *cosv, const float *sinv)
{
    const int32_t half = D / 2;
    for (int32_t hd = 0; hd < n_heads; hd++) {
        float *x = v + (size_t)hd * D;
        for (int32_t i = 0; i < half; i++) {
            float a = x[i], b = x[i + half];
            x[i] = a * cosv[i] - b * sinv[i];
            x[i + half] = a * sinv[i] + b * cosv[i];
        }
    }
}

/* ------------------------------------------------------------------ parallel jobs */

/* Work is handed out in chunks from a shared counter (bn_queue) rather than split statically:
 * on a machine with as many vCPUs as threads, a thread that loses its CPU would otherwise hold
 * up the whole step. Which thread computes a row never changes its value. */
typedef struct {
    const bn_ternary *w;
    float *y;           /* [T][w->n_out] */
} matmul_part;

typedef struct {
    const bn_kernel_set *k;
    const bn_qact *a;
    matmul_part parts[3];
    int n_parts;
    int32_t total_rows;
    bn_queue queue;
} matmul_job;

static void matmul_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)ith;
    (void)nth;
    matmul_job *job = arg;
    int64_t lo, hi;
    while (bn_queue_grab(&job->queue, &lo, &hi)) {
        int32_t base = 0;
        for (int p = 0; p < job->n_parts; p++) {
            const bn_ternary *w = job->parts[p].w;
            int64_t a = lo > base ? lo : base;
            int64_t b = hi < base + w->n_out ? hi : base + w->n_out;
            if (a < b)
                job->k->ternary(w, (int32_t)(a - base), (int32_t)(b - base), job->a,
                                job->parts[p].y, w->n_out);
            base += w->n_out;
        }
    }
}

static void run_matmul(bn_context *ctx, const bn_kernel_set *k, const bn_qact *a,
                       const bn_ternary *w0, float *y0, const bn_ternary *w1, float *y1,
                       const bn_ternary *w2, float *y2)
{
    matmul_job job = {k, a, {{w0, y0}, {w1, y1}, {w2, y2}}, 1, w0->n_out, {0}};
    if (w1) {
        job.n_parts = 2;
        job.total_rows += w1->n_out;
    }
    if (w2) {
        job.n_parts = 3;
        job.total_rows += w2->n_out;
    }
    bn_queue_init(&job.queue, job.total_rows, bn_pool_threads(ctx->pool), 4, 16);
    bn_pool_run(ctx->pool, matmul_worker, &job);
}

typedef struct {
    bn_context *ctx;
    int32_t layer;
    int32_t n_tok;
    bn_queue queue;
} attn_job;

/* Four dot products at once: four independent dependency chains, each the exact arithmetic
 * of dot_fixed (same lanes, same order, same tree). */
static inline __attribute__((always_inline)) void dot4_fixed(const float *const a[4],
                                                             const float *const b[4],
                                                             int32_t n, float out[4])
{
    bn_v8f p[4] = {{0}, {0}, {0}, {0}};
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 4; k++) {
            bn_v8f x, y;
            memcpy(&x, a[k] + i, sizeof x);
            memcpy(&y, b[k] + i, sizeof y);
            p[k] += x * y;
        }
    for (; i < n; i++)
        for (int k = 0; k < 4; k++)
            p[k][0] += a[k][i] * b[k][i];
    for (int k = 0; k < 4; k++) {
        float s4[4];
        for (int l = 0; l < 4; l++)
            s4[l] = p[k][l] + p[k][l + 4];
        out[k] = (s4[0] + s4[2]) + (s4[1] + s4[3]);
    }
}

/* o[c*16 .. c*16+15] for c < m (m 16-wide chunks of one head's output) =
 * inv * sum over t ascending of p_t * v_t[...]: m independent accumulators in registers. */
static inline __attribute__((always_inline)) void weighted_sum(const float *sg, const float *vc,
                                                               size_t kvd, int32_t pos,
                                                               const int m, float inv, float *o)
{
    bn_v16f acc[8];
    for (int c = 0; c < m; c++)
        acc[c] = (bn_v16f){0};
    for (int32_t t = 0; t <= pos; t++) {
        const float p = sg[t];
        const float *vt = vc + (size_t)t * kvd;
        for (int c = 0; c < m; c++) {
            bn_v16f v;
            memcpy(&v, vt + 16 * c, sizeof v);
            acc[c] += p * v;
        }
    }
    for (int c = 0; c < m; c++) {
        acc[c] *= inv;
        memcpy(o + 16 * c, &acc[c], sizeof acc[c]);
    }
}

/* Causal attention of token i's query heads hd0..hd0+group-1, which share one kv head:
 * each K and V row is loaded once for the whole group. Every head's arithmetic runs in the
 * same fixed order as if it were alone (scores, max, exp-sum in position order, weighted
 * sum in position order, one multiplication by 1/sum), so results do not depend on the
 * grouping or the batch. Cloned for wider vectors: the operations and their order stay the
 * same (no contraction in ISO C mode). */
__attribute__((target_clones("avx512f", "avx2", "default")))
static void attend_group(const float *q, const float *kc, const float *vc, size_t kvd,
                         int32_t pos, int32_t D, int32_t group, float inv_sqrt_d,
                         float *scores, size_t score_stride, float *out)
{
    float mx[64], sum[64];
    for (int32_t g = 0; g < group; g++)
        mx[g] = -INFINITY;
    /* scores for every (position, head) pair, four pairs at a time */
    const int64_t n_pairs = (int64_t)(pos + 1) * group;
    for (int64_t idx = 0; idx < n_pairs; idx += 4) {
        const int n = n_pairs - idx < 4 ? (int)(n_pairs - idx) : 4;
        const float *qa[4], *kb[4];
        int32_t tt[4], gg[4];
        for (int k = 0; k < 4; k++) {
            const int64_t j = idx + (k < n ? k : 0);
            tt[k] = (int32_t)(j / group);
            gg[k] = (int32_t)(j % group);
            qa[k] = q + (size_t)gg[k] * D;
            kb[k] = kc + (size_t)tt[k] * kvd;
        }
        float d4[4];
        dot4_fixed(qa, kb, D, d4);
        for (int k = 0; k < n; k++) {
            const float sc = d4[k] * inv_sqrt_d;
            scores[gg[k] * score_stride + (size_t)tt[k]] = sc;
            if (sc > mx[gg[k]])
                mx[gg[k]] = sc;
        }
    }
    for (int32_t g = 0; g < group; g++) {
        float *sg = scores + g * score_stride;
        float acc = 0.0f;
        for (int32_t t = 0; t <= pos; t++) {
            const float e = expf(sg[t] - mx[g]);
            sg[t] = e;
            acc += e;
        }
        sum[g] = acc;
    }
    for (int32_t g = 0; g < group; g++) {
        const float *sg = scores + g * score_stride;
        float *o = out + (size_t)g * D;
        const float inv = 1.0f / sum[g];
        const int32_t chunks = D / 16;
        int32_t c = 0;
        for (; c + 8 <= chunks; c += 8)
            weighted_sum(sg, vc + 16 * c, kvd, pos, 8, inv, o + 16 * c);
        if (c + 4 <= chunks) {
            weighted_sum(sg, vc + 16 * c, kvd, pos, 4, inv, o + 16 * c);
            c += 4;
        }
        if (c + 2 <= chunks) {
            weighted_sum(sg, vc + 16 * c, kvd, pos, 2, inv, o + 16 * c);
            c += 2;
        }
        if (c < chunks)
            weighted_sum(sg, vc + 16 * c, kvd, pos, 1, inv, o + 16 * c);
        for (int32_t d = chunks * 16; d < D; d++) {
            float acc = 0.0f;
            for (int32_t t = 0; t <= pos; t++)
                acc += sg[t] * vc[(size_t)t * kvd + d];
            o[d] = acc * inv;
        }
    }
}

static void attn_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)nth;
    attn_job *job = arg;
    bn_context *ctx = job->ctx;
    const bn_hparams *hp = &ctx->hp;
    const int32_t Hkv = hp->n_head_kv, D = hp->head_dim, group = hp->n_head / hp->n_head_kv;
    const int32_t kvd = ctx->kv_dim, E = hp->n_embd;
    const float inv_sqrt_d = 1.0f / sqrtf((float)D);
    float *scores = ctx->scores + (size_t)ith * ctx->scores_per_thread;
    int64_t lo, hi;
    while (bn_queue_grab(&job->queue, &lo, &hi)) {
        for (int64_t item = lo; item < hi; item++) {
            const int32_t i = (int32_t)(item / Hkv), kh = (int32_t)(item % Hkv);
            const int32_t slot = ctx->tok_slot[i], pos = ctx->tok_pos[i];
            const size_t layer_base =
                ((size_t)slot * hp->n_layer + (size_t)job->layer) * (size_t)ctx->n_ctx * kvd;
            const size_t q_off = (size_t)i * E + (size_t)kh * group * D;
            attend_group(ctx->q + q_off, ctx->kcache + layer_base + (size_t)kh * D,
                         ctx->vcache + layer_base + (size_t)kh * D, (size_t)kvd, pos, D, group,
                         inv_sqrt_d, scores, (size_t)ctx->n_ctx, ctx->att + q_off);
        }
    }
}

typedef struct {
    const bn_kernel_set *k;
    const uint16_t *head;
    int32_t n_in, n_vocab, n_tok;
    const float *x;
    float *y;
    bn_queue queue;
} head_job;

static void head_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)ith;
    (void)nth;
    head_job *job = arg;
    int64_t lo, hi;
    while (bn_queue_grab(&job->queue, &lo, &hi))
        job->k->f16_matmul(job->head, job->n_in, (int32_t)lo, (int32_t)hi, job->x, job->n_tok,
                           job->n_in, job->y, job->n_vocab);
}

/* ------------------------------------------------------------------ one chunk */

/* RMSNorm of every token row of src (n wide) with weights w, then its int8 quantization
 * into ctx->qa. Per token, so the result never depends on the split across threads. */
typedef struct {
    bn_context *ctx;
    const bn_kernel_set *k;
    const float *src;
    const float *w;
    int32_t n;
    bn_queue queue;
} norm_quant_job;

static void norm_quant_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)ith;
    (void)nth;
    norm_quant_job *job = arg;
    bn_context *ctx = job->ctx;
    const size_t n = (size_t)job->n;
    int64_t lo, hi;
    while (bn_queue_grab(&job->queue, &lo, &hi))
        for (int64_t i = lo; i < hi; i++) {
            float *h = ctx->h + (size_t)i * n;
            rmsnorm(job->src + (size_t)i * n, job->w, job->n, ctx->hp.rms_eps, h);
            job->k->quantize(h, job->n, ctx->qa + (size_t)i * n, &ctx->qa_s[i], &ctx->qa_sum[i]);
        }
}

static void norm_quantize(bn_context *ctx, const bn_kernel_set *k, const float *src,
                          const float *w, int32_t n, int32_t T)
{
    norm_quant_job job = {ctx, k, src, w, n, {0}};
    bn_queue_init(&job.queue, T, bn_pool_threads(ctx->pool), 1, 1);
    if (T == 1)
        norm_quant_worker(&job, 0, 1);   /* not worth waking the pool */
    else
        bn_pool_run(ctx->pool, norm_quant_worker, &job);
    if (k->prepare)
        k->prepare(ctx->qa, n, n, T, ctx->qa_tiles);
}

/* Run the tokens tok_*[0..T) through the model; logits for the tokens whose tok_row >= 0,
 * whose rows are consecutive starting at the first such row. */
static void forward_chunk(bn_context *ctx, const bn_kernel_set *k, int32_t T)
{
    const bn_model *m = ctx->m;
    const bn_hparams *hp = &ctx->hp;
    const int32_t E = hp->n_embd, F = hp->n_ff, D = hp->head_dim, kvd = ctx->kv_dim;
    const float eps = hp->rms_eps;

    for (int32_t i = 0; i < T; i++)
        bn_f16_row_to_f32(m->tok_embd + (size_t)ctx->tok_id[i] * E, E, ctx->x + (size_t)i * E);

    for (int32_t l = 0; l < hp->n_layer; l++) {
        const bn_layer *L = &m->layers[l];
        /* attention block */
        norm_quantize(ctx, k, ctx->x, L->attn_norm, E, T);
        bn_qact a = {ctx->qa, E, T, ctx->qa_s, ctx->qa_sum, ctx->qa_tiles};
        run_matmul(ctx, k, &a, &L->wq, ctx->q, &L->wk, ctx->k, &L->wv, ctx->v);
        for (int32_t i = 0; i < T; i++) {
            const size_t rp = (size_t)ctx->tok_pos[i] * (D / 2);
            rope(ctx->q + (size_t)i * E, hp->n_head, D, ctx->rope_cos + rp, ctx->rope_sin + rp);
            rope(ctx->k + (size_t)i * kvd, hp->n_head_kv, D, ctx->rope_cos + rp,
                 ctx->rope_sin + rp);
            const size_t at = (((size_t)ctx->tok_slot[i] * hp->n_layer + (size_t)l) * ctx->n_ctx +
                               (size_t)ctx->tok_pos[i]) * kvd;
            memcpy(ctx->kcache + at, ctx->k + (size_t)i * kvd, (size_t)kvd * sizeof(float));
            memcpy(ctx->vcache + at, ctx->v + (size_t)i * kvd, (size_t)kvd * sizeof(float));
        }
        attn_job aj = {ctx, l, T, {0}};
        bn_queue_init(&aj.queue, (int64_t)T * hp->n_head_kv, bn_pool_threads(ctx->pool), 4, 1);
        bn_pool_run(ctx->pool, attn_worker, &aj);
        norm_quantize(ctx, k, ctx->att, L->attn_sub_norm, E, T);
        run_matmul(ctx, k, &a, &L->wo, ctx->tmp, NULL, NULL, NULL, NULL);
        add_rows(ctx->x, ctx->tmp, (size_t)T * E);

        /* feed-forward block */
        norm_quantize(ctx, k, ctx->x, L->ffn_norm, E, T);
        run_matmul(ctx, k, &a, &L->w_gate, ctx->g, &L->w_up, ctx->u, NULL, NULL);
        relu_sq_mul(ctx->g, ctx->u, (size_t)T * F);
        norm_quantize(ctx, k, ctx->g, L->ffn_sub_norm, F, T);
        bn_qact af = {ctx->qa, F, T, ctx->qa_s, ctx->qa_sum, ctx->qa_tiles};
        run_matmul(ctx, k, &af, &L->w_down, ctx->tmp, NULL, NULL, NULL, NULL);
        add_rows(ctx->x, ctx->tmp, (size_t)T * E);
    }

    int32_t n_out = 0, first_row = -1;
    for (int32_t i = 0; i < T; i++) {
        if (ctx->tok_row[i] < 0)
            continue;
        if (first_row < 0)
            first_row = ctx->tok_row[i];
        rmsnorm(ctx->x + (size_t)i * E, m->output_norm, E, eps, ctx->ynorm + (size_t)n_out * E);
        n_out++;
    }
    if (n_out > 0) {
        head_job hj = {k, m->head, E, hp->n_vocab, n_out, ctx->ynorm,
                       ctx->logits + (size_t)first_row * hp->n_vocab, {0}};
        bn_queue_init(&hj.queue, hp->n_vocab, bn_pool_threads(ctx->pool), 4, 16);
        bn_pool_run(ctx->pool, head_worker, &hj);
    }
}

/* ------------------------------------------------------------------ bn_forward */

/* 0, or -1 - e when entry e is at fault, or 1 when the call as a whole is (no entry is). */
static int validate(bn_context *ctx, const bn_batch_entry *entries, int32_t n_entries,
                    int64_t *n_rows, char *err, size_t errlen)
{
    if (n_entries < 0 || (n_entries > 0 && !entries)) {
        bn_set_err(err, errlen, "bad entry list (%d entries)", n_entries);
        return 1;
    }
    if (n_entries > ctx->n_slots) {
        bn_set_err(err, errlen, "%d entries for %d slots: slots must be distinct", n_entries,
                ctx->n_slots);
        return 1;
    }
    /* a new stamp per call; start over before the int32 would overflow (signed: UB) */
    if (ctx->stamp == INT32_MAX) {
        memset(ctx->slot_seen, 0, (size_t)ctx->n_slots * sizeof(int32_t));
        ctx->stamp = 0;
    }
    ctx->stamp++;
    int64_t rows = 0;
    for (int32_t e = 0; e < n_entries; e++) {
        const bn_batch_entry *be = &entries[e];
        if (be->slot < 0 || be->slot >= ctx->n_slots) {
            bn_set_err(err, errlen, "entry %d: slot %d out of range 0..%d", e, be->slot,
                    ctx->n_slots - 1);
            return -1 - e;
        }
        if (ctx->slot_seen[be->slot] == ctx->stamp) {
            bn_set_err(err, errlen, "entry %d: slot %d appears twice in one batch", e, be->slot);
            return -1 - e;
        }
        ctx->slot_seen[be->slot] = ctx->stamp;
        if (be->n_tokens < 0 || (be->n_tokens > 0 && !be->tokens)) {
            bn_set_err(err, errlen, "entry %d (slot %d): bad token list (%d tokens)", e, be->slot,
                    be->n_tokens);
            return -1 - e;
        }
        if (be->logits < BN_LOGITS_NONE || be->logits > BN_LOGITS_ALL) {
            bn_set_err(err, errlen, "entry %d (slot %d): bad logits mode %d", e, be->slot,
                    be->logits);
            return -1 - e;
        }
        for (int32_t t = 0; t < be->n_tokens; t++)
            if (be->tokens[t] < 0 || be->tokens[t] >= ctx->hp.n_vocab) {
                bn_set_err(err, errlen, "entry %d (slot %d): token %d at index %d out of range "
                        "0..%d", e, be->slot, be->tokens[t], t, ctx->hp.n_vocab - 1);
                return -1 - e;
            }
        const int32_t pos = ctx->pos[be->slot];
        if ((int64_t)pos + be->n_tokens > ctx->n_ctx) {
            bn_set_err(err, errlen, "entry %d (slot %d): %d tokens at position %d exceed the "
                    "context size %d", e, be->slot, be->n_tokens, pos, ctx->n_ctx);
            return -1 - e;
        }
        if (be->n_tokens > 0)
            rows += be->logits == BN_LOGITS_ALL ? be->n_tokens
                                                : (be->logits == BN_LOGITS_LAST ? 1 : 0);
    }
    *n_rows = rows;
    return 0;
}

static int entry_cancelled(const bn_batch_entry *be)
{
    return be->cancel && bn_cancel_is_set(be->cancel);
}

int bn_forward(bn_context *ctx, bn_batch_entry *entries, int32_t n_entries, char *err,
               size_t errlen)
{
    if (!ctx) {
        bn_set_err(err, errlen, "no context");
        return -1;
    }
    ctx->n_ents = 0;
    int64_t n_rows = 0;
    int rc = validate(ctx, entries, n_entries, &n_rows, err, errlen);
    if (rc == 0 && n_rows > ctx->logits_cap) {
        const size_t nv = (size_t)ctx->hp.n_vocab;
        float *grown = (size_t)n_rows > SIZE_MAX / sizeof(float) / nv
                           ? NULL
                           : realloc(ctx->logits, (size_t)n_rows * nv * sizeof(float));
        if (!grown) {
            bn_set_err(err, errlen, "out of memory for %lld logits rows", (long long)n_rows);
            rc = 1;   /* no entry at fault: every status -2 */
        } else {
            ctx->logits = grown;
            ctx->logits_cap = n_rows;
        }
    }
    if (rc != 0) {
        /* nothing was applied: the offending entry -1, every other -2 */
        int32_t bad = rc <= -1 ? -1 - rc : -1;
        for (int32_t e = 0; e < n_entries && entries; e++)
            entries[e].status = e == bad ? -1 : -2;
        return -1;
    }

    const bn_kernel_set *k = bn_kernels();
    for (int32_t e = 0; e < n_entries; e++) {
        entry_state *st = &ctx->ents[e];
        st->mode = entries[e].logits;
        st->n_tokens = entries[e].n_tokens;
        st->done = 0;
        st->orig_pos = ctx->pos[entries[e].slot];
        st->base_row = -1;
        st->status = 0;
    }
    int64_t next_row = 0;
    int32_t e = 0;  /* entry holding the next unprocessed token */
    for (;;) {
        /* cancellation is checked before every chunk: a cancelled entry is rolled back */
        for (int32_t c = 0; c < n_entries; c++) {
            entry_state *st = &ctx->ents[c];
            if (st->status == 0 && st->done < st->n_tokens && entry_cancelled(&entries[c])) {
                st->status = 1;
                ctx->pos[entries[c].slot] = st->orig_pos;
            }
        }
        while (e < n_entries &&
               (ctx->ents[e].status != 0 || ctx->ents[e].done >= ctx->ents[e].n_tokens))
            e++;
        if (e >= n_entries)
            break;
        int32_t T = 0;
        for (int32_t c = e; c < n_entries && T < ctx->max_chunk; c++) {
            entry_state *st = &ctx->ents[c];
            const bn_batch_entry *be = &entries[c];
            if (st->status != 0)
                continue;
            while (st->done < st->n_tokens && T < ctx->max_chunk) {
                const int32_t t = st->done;
                const int want = st->mode == BN_LOGITS_ALL ||
                                 (st->mode == BN_LOGITS_LAST && t == st->n_tokens - 1);
                ctx->tok_slot[T] = be->slot;
                ctx->tok_pos[T] = st->orig_pos + t;
                ctx->tok_id[T] = be->tokens[t];
                ctx->tok_row[T] = want ? (int32_t)next_row : -1;
                if (want) {
                    if (st->base_row < 0)
                        st->base_row = next_row;
                    next_row++;
                }
                st->done++;
                T++;
            }
            ctx->pos[be->slot] = st->orig_pos + st->done;
        }
        forward_chunk(ctx, k, T);
    }
    for (int32_t c = 0; c < n_entries; c++)
        entries[c].status = ctx->ents[c].status;
    ctx->n_ents = n_entries;
    return 0;
}

const float *bn_logits(const bn_context *ctx, int32_t entry, int32_t t)
{
    if (!ctx || entry < 0 || entry >= ctx->n_ents)
        return NULL;
    const entry_state *st = &ctx->ents[entry];
    if (st->status != 0 || st->base_row < 0 || t < 0 || t >= st->n_tokens)
        return NULL;
    int64_t row;
    if (st->mode == BN_LOGITS_ALL)
        row = st->base_row + t;
    else if (st->mode == BN_LOGITS_LAST && t == st->n_tokens - 1)
        row = st->base_row;
    else
        return NULL;
    return ctx->logits + (size_t)row * (size_t)ctx->hp.n_vocab;
}
