/* forward.c - the arithmetic of the forward pass for one chunk of tokens (model-format §5).
 *
 * bn_forward (context.c) gathers the tokens of every batch entry into one chunk and
 * bn_forward_chunk, at the bottom of this file, runs each layer once for all of them, so every
 * weight byte read from memory serves the whole batch. The helpers above it come in the order
 * of the steps of model-format §5, which bn_forward_chunk numbers.
 *
 * Each token's arithmetic is independent of the other tokens and of the thread count: the
 * matrix kernels compute every output on its own in a fixed order (kernels/kernels.h), and
 * the per-token steps (norms, RoPE, attention) run one token at a time in a fixed order. So a
 * sequence gets bit-identical logits whatever else is in the batch. reference.c holds plain
 * versions of RMSNorm, RoPE and attention that tests compare with these, bit for bit
 * (bn_test_* at the end of this file).
 *
 * Work is handed out to the pool's threads in chunks from a shared counter (bn_queue) rather
 * than split statically: on a machine with as many vCPUs as threads, a thread that loses its
 * CPU would otherwise hold up the whole step. Which thread computes a row never changes its
 * value.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "context.h"
#include "kernels/kernels.h"
#include "model.h"
#include "threadpool.h"

/* ----------------------------------------------------------------------------- fixed-order sums */

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

/* Four dot products at once: four independent dependency chains, each the exact arithmetic
 * of dot_fixed (same lanes, same order, same tree). */
static inline __attribute__((always_inline)) void
dot4_fixed(const float *const a[4], const float *const b[4], int32_t n, float out[4])
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

/* -------------------------------------- model-format §5.2.1 RMSNorm, §5.4.1-§5.4.2 quantization */

/* out = RMSNorm(x) * w over n floats: mean of squares in dot_fixed's order, then one
 * reciprocal square root multiplied in (model-format §5.2.1). */
static void rmsnorm(const float *x, const float *w, int32_t n, float eps, float *out)
{
    float ss = dot_fixed(x, x, n);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int32_t i = 0; i < n; i++)
        out[i] = w[i] * (x[i] * r);
}

/* RMSNorm of every token row of src (n wide) with weights w into ctx->h, then its int8
 * quantization into ctx->qa, qa_s, qa_sum (model-format §5.4.1-§5.4.2). w NULL: quantize
 * src itself, for graphs without a norm at that point (model-format §10.4.2). w_in: a second
 * RMSNorm, the projection's own input norm (model-format §10.5.2), applied to that result
 * into ctx->h_in before the quantization; NULL for graphs without it. Per token, so the
 * result never depends on the split across threads. */
typedef struct {
    bn_context *ctx;
    const bn_kernel_set *k;
    const float *src;  /* [T][n] f32: rows to normalise */
    const float *w;    /* [n] f32: the norm's weights, or NULL for no norm */
    const float *w_in; /* [n] f32: the projection's input norm, or NULL */
    int32_t n;
    bn_queue queue; /* over the T tokens */
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
            const float *h = job->src + (size_t)i * n;
            if (job->w) {
                float *hn = ctx->h + (size_t)i * n;
                rmsnorm(h, job->w, job->n, ctx->hp.rms_eps, hn);
                h = hn;
            }
            if (job->w_in) {
                float *hn = ctx->h_in + (size_t)i * n;
                rmsnorm(h, job->w_in, job->n, ctx->hp.rms_eps, hn);
                h = hn;
            }
            bn_quantizer(job->k, ctx->m->arch->weight_format)(h, job->n, ctx->qa + (size_t)i * n,
                                                              &ctx->qa_s[i], &ctx->qa_sum[i]);
        }
}

static void norm_quantize(bn_context *ctx, const bn_kernel_set *k, const float *src, const float *w,
                          const float *w_in, int32_t n, int32_t T)
{
    norm_quant_job job = {ctx, k, src, w, w_in, n, {0}};
    bn_queue_init(&job.queue, T, bn_pool_threads(ctx->pool), 1, 1);
    if (T == 1)
        norm_quant_worker(&job, 0, 1); /* not worth waking the pool */
    else
        bn_pool_run(ctx->pool, norm_quant_worker, &job);
    if (bn_uses_tiles(k, ctx->m->arch->weight_format))
        k->prepare(ctx->qa, n, n, T, ctx->qa_tiles);
}

/* ---------------------------------------------------------------- model-format §5.2.2 BitLinear */

typedef struct {
    const bn_ternary *w;
    float *y; /* [T][w->n_out] f32 */
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
                bn_weights_rows(job->k, w, (int32_t)(a - base), (int32_t)(b - base), job->a,
                                job->parts[p].y, w->n_out);
            base += w->n_out;
        }
    }
}

/* y0 = BitLinear(a, w0), and y1, y2 for w1, w2 when given (model-format §5.4): matrices
 * that share one quantized input run as one job, their rows handed out together. */
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

/* --------------------------------------------------------------------- model-format §5.2.3 RoPE */

/* The YaRN ramp bounds of model-format §5.2.3.1. A pair whose angle turns n_rot full circles
 * over the original context has index D ln(orig / (2 pi n_rot)) / (2 ln base) (the inverse of
 * orig * base^(-2i/D) = 2 pi n_rot); the pairs from the beta_fast one down keep their angles
 * (they turned often enough in training to have seen every phase), those from the beta_slow
 * one up are interpolated, and the ones between blend linearly. The loader guarantees
 * base > 1, orig > 0 and positive finite betas, so both values are finite. */
static void yarn_bounds(int32_t D, float base, const bn_rope_scaling *sc, double *low, double *high)
{
    const double two_pi = 6.283185307179586476925;
    const double denom = 2.0 * log((double)base);
    const double orig = (double)sc->orig_ctx;
    const double fast = D * log(orig / ((double)sc->beta_fast * two_pi)) / denom;
    const double slow = D * log(orig / ((double)sc->beta_slow * two_pi)) / denom;
    *low = fmax(0.0, floor(fast));
    *high = fmin((double)(D - 1), ceil(slow));
}

/* cos and sin of the angle of pair i < D/2 at pos (model-format §5.2.3: pos * base^(-2i/D);
 * with scaling, §5.2.3.1), times the scaling's magnitude, computed in double and rounded to
 * float once. context.c fills its per-position tables with it. Without scaling the magnitude
 * is exactly 1, so the unscaled angles are bit for bit those of before scaling existed. */
void bn_rope_angles(int32_t pos, int32_t D, float base, const bn_rope_scaling *sc, float *cosv,
                    float *sinv)
{
    const int32_t type = sc ? sc->type : BN_ROPE_SCALING_NONE;
    const double factor = type == BN_ROPE_SCALING_NONE ? 1.0 : (double)sc->factor;
    double mscale = sc ? (double)sc->attn_factor : 1.0;
    double low = 0.0, high = 0.0;
    if (type == BN_ROPE_SCALING_YARN) {
        yarn_bounds(D, base, sc, &low, &high);
        mscale *= 1.0 + 0.1 * log(factor); /* interpolation flattens attention: sharpen it */
    }
    for (int32_t i = 0; i < D / 2; i++) {
        const double extrap = (double)pos * pow((double)base, -2.0 * i / D);
        double theta = extrap;
        if (type == BN_ROPE_SCALING_LINEAR)
            theta = extrap / factor;
        else if (type == BN_ROPE_SCALING_YARN) {
            const double t = fmin(1.0, fmax(0.0, (i - low) / fmax(0.001, high - low)));
            const double keep = 1.0 - t; /* 1: the unscaled angle, 0: the interpolated one */
            theta = extrap / factor * (1.0 - keep) + extrap * keep;
        }
        cosv[i] = (float)(cos(theta) * mscale);
        sinv[i] = (float)(sin(theta) * mscale);
    }
}

/* RoPE in place on n_heads heads of D floats; cosv, sinv: the D/2 angles of the token's
 * position (bn_rope_angles). Angle i rotates the pair (i, i + D/2) with NeoX pairing
 * (model-format §5.2.3) and (2i, 2i + 1) with adjacent pairing (model-format §10.4.1). */
static void rope(float *v, int32_t n_heads, int32_t D, const float *cosv, const float *sinv,
                 int adjacent)
{
    const int32_t half = D / 2;
    const int32_t step = adjacent ? 1 : half; /* distance between a pair's two members */
    const int32_t stride = adjacent ? 2 : 1;  /* distance between pairs i and i + 1 */
    for (int32_t hd = 0; hd < n_heads; hd++) {
        float *x = v + (size_t)hd * D;
        for (int32_t i = 0; i < half; i++) {
            float *p = x + (size_t)i * stride;
            float a = p[0], b = p[step];
            p[0] = a * cosv[i] - b * sinv[i];
            p[step] = a * sinv[i] + b * cosv[i];
        }
    }
}

/* --------------------------------------------------------- model-format §5.2.5 causal attention */

/* o[c*16 .. c*16+15] for c < m (m 16-wide chunks of one head's output) =
 * inv * sum over t ascending of p_t * v_t[...]: m independent accumulators in registers. */
static inline __attribute__((always_inline)) void weighted_sum(const float *sg, const float *vc,
                                                               size_t kvd, int32_t pos, const int m,
                                                               float inv, float *o)
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

/* Causal attention (model-format §5.2.5) of one token's query heads hd0..hd0+group-1, which
 * share one kv head: each K and V row is loaded once for the whole group. Every head's
 * arithmetic runs in the same fixed order as if it were alone (scores, max, exp-sum in
 * position order, weighted sum in position order, one multiplication by 1/sum), so results do
 * not depend on the grouping or the batch. Cloned for wider vectors: the operations and their
 * order stay the same (no contraction in ISO C mode). The clones are x86 only: elsewhere
 * (aarch64) the one portable version is compiled. */
#ifdef BN_X86
#define BN_ATTEND_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define BN_ATTEND_CLONES
#endif
BN_ATTEND_CLONES static void attend_group(const float *q, const float *kc, const float *vc,
                                          size_t kvd, int32_t pos, int32_t D, int32_t group,
                                          float inv_sqrt_d, float *scores, size_t score_stride,
                                          float *out)
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

typedef struct {
    bn_context *ctx;
    int32_t layer;
    int32_t n_tok;
    bn_queue queue;
} attn_job;

/* Items are (token, kv head) pairs: token i's query heads of kv head kh against the cache
 * of its slot, positions 0..pos. */
static void attn_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)nth;
    attn_job *job = arg;
    bn_context *ctx = job->ctx;
    const bn_hparams *hp = &ctx->hp;
    const int32_t Hkv = hp->n_head_kv, D = hp->head_dim, group = hp->n_head / hp->n_head_kv;
    const int32_t kvd = ctx->kv_dim, qd = ctx->q_dim;
    const float inv_sqrt_d = 1.0f / sqrtf((float)D);
    float *scores = ctx->scores + (size_t)ith * ctx->scores_per_thread;
    int64_t lo, hi;
    while (bn_queue_grab(&job->queue, &lo, &hi)) {
        for (int64_t item = lo; item < hi; item++) {
            const int32_t i = (int32_t)(item / Hkv), kh = (int32_t)(item % Hkv);
            const int32_t slot = ctx->tok_slot[i], pos = ctx->tok_pos[i];
            const size_t layer_base =
                ((size_t)slot * hp->n_layer + (size_t)job->layer) * (size_t)ctx->n_ctx * kvd;
            const size_t q_off = (size_t)i * qd + (size_t)kh * group * D;
            attend_group(ctx->q + q_off, ctx->kcache + layer_base + (size_t)kh * D,
                         ctx->vcache + layer_base + (size_t)kh * D, (size_t)kvd, pos, D, group,
                         inv_sqrt_d, scores, (size_t)ctx->n_ctx, ctx->att + q_off);
        }
    }
}

/* -------------------------------------------- model-format §5.2.7-§5.2.10 the rest of the layer */

/* x += y, the residual adds of model-format §5.2.7 and §5.2.10; restrict lets the compiler
 * vectorize */
static void add_rows(float *restrict x, const float *restrict y, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* g = max(g, 0)^2 * u, the squared-ReLU gate (model-format §5.2.9) */
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

/* g = silu(g) * u = g / (1 + exp(-g)) * u, the SiLU gate (model-format §10.4.2). For
 * g < -88 exp(-g) is +inf and the quotient -0: no special case needed. */
static void silu_mul(float *restrict g, const float *restrict u, size_t n)
{
    for (size_t i = 0; i < n; i++)
        g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* ------------------------------------------------------- model-format §10.6.3 Q2_0 embedding row
 */

/* out[0..n_in) = row r of a Q2_0 matrix, dequantized: (code - 1) * d, exact in f32. */
static void q2_0_row(const bn_ternary *w, int32_t r, float *out)
{
    const int32_t nb = w->n_in / 64;
    const uint8_t *row = w->codes + (size_t)r * (size_t)nb * BN_Q2_0_BLOCK;
    for (int32_t g = 0; g < nb; g++) {
        const uint8_t *b = row + (size_t)g * BN_Q2_0_BLOCK;
        uint16_t h;
        memcpy(&h, b, sizeof h);
        const float d = bn_f16_to_f32(h);
        for (int j = 0; j < 64; j++)
            out[g * 64 + j] = (float)(((b[2 + j / 4] >> (2 * (j % 4))) & 3) - 1) * d;
    }
}

/* out[0..n_in) = row r of a Q8_0 matrix (model-format §10.1.6), dequantized: q * d, exact in
 * f32 (the same values the Q8_0 head multiplies). */
static void q8_0_row(const uint8_t *w, int32_t n_in, int32_t r, float *out)
{
    const int32_t nb = n_in / 32;
    const uint8_t *row = w + (size_t)r * (size_t)nb * BN_Q8_0_BLOCK;
    for (int32_t b = 0; b < nb; b++)
        bn_q8_0_block(row + (size_t)b * BN_Q8_0_BLOCK, out + (size_t)b * 32);
}

/* ---------------------------------------------------------------- model-format §5.3 output head */

/* logits = head (F16 or Q8_0) . y for n_tok rows y (model-format §5.3), vocabulary rows
 * shared out. */
typedef struct {
    const bn_kernel_set *k;
    const uint16_t *head; /* [n_vocab][n_in] F16, or NULL for a Q8_0 head */
    const uint8_t *head8; /* [n_vocab] rows of n_in/32 Q8_0 blocks, or NULL */
    int32_t n_in, n_vocab, n_tok;
    const float *x; /* [n_tok][n_in] f32: the output-normed rows (ctx->ynorm) */
    float *y;       /* [n_tok][n_vocab] f32: their logits rows */
    bn_queue queue; /* over the n_vocab rows */
} head_job;

static void head_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)ith;
    (void)nth;
    head_job *job = arg;
    int64_t lo, hi;
    while (bn_queue_grab(&job->queue, &lo, &hi)) {
        if (job->head8)
            job->k->q8_0_matmul(job->head8, job->n_in, (int32_t)lo, (int32_t)hi, job->x, job->n_tok,
                                job->n_in, job->y, job->n_vocab);
        else
            job->k->f16_matmul(job->head, job->n_in, (int32_t)lo, (int32_t)hi, job->x, job->n_tok,
                               job->n_in, job->y, job->n_vocab);
    }
}

/* ------------------------------------------------------------------------------------ one chunk */

/* Run the tokens tok_*[0..T) through the model; logits for the tokens whose tok_row >= 0,
 * whose rows are consecutive starting at the first such row; y into hidden[tok_hrow] for
 * those whose tok_hrow >= 0. Buffers: context.h. */
void bn_forward_chunk(bn_context *ctx, const bn_kernel_set *k, int32_t T)
{
    const bn_model *m = ctx->m;
    const bn_hparams *hp = &ctx->hp;
    const int32_t E = hp->n_embd, F = hp->n_ff, D = hp->head_dim, kvd = ctx->kv_dim;
    const int32_t qd = ctx->q_dim; /* E for BitNet (model-format §10.1.4) */
    const float eps = hp->rms_eps;
    const bn_arch *arch = m->arch; /* which variant of a step (model-format §10.1) */
    const int adjacent = arch->rope_pairing == BN_ROPE_ADJACENT;

    /* 1. (model-format §5.1) x = the token's row of token_embd, F16 -> F32; a Q2_0 row is
     * dequantized, (code - 1) * d (§10.6.3), a Q8_0 one q * d (§10.1.6) */
    for (int32_t i = 0; i < T; i++) {
        if (m->tok_embd)
            bn_f16_row_to_f32(m->tok_embd + (size_t)ctx->tok_id[i] * E, E, ctx->x + (size_t)i * E);
        else if (m->tok_embd_q8)
            q8_0_row(m->tok_embd_q8, E, ctx->tok_id[i], ctx->x + (size_t)i * E);
        else
            q2_0_row(&m->tok_embd_q2, ctx->tok_id[i], ctx->x + (size_t)i * E);
    }

    /* 2. (model-format §5.2) every layer, for all T tokens at once */
    for (int32_t l = 0; l < hp->n_layer; l++) {
        const bn_layer *L = &m->layers[l];

        /* 2.1 (model-format §5.2.1) h = RMSNorm(x, attn_norm), quantized once for q, k and v
         * (§5.4.1-§5.4.2); with input norms each projection quantizes its own
         * RMSNorm(h, <proj>_norm_in) (§10.5.2) */
        bn_qact a = {ctx->qa, E, T, ctx->qa_s, ctx->qa_sum, ctx->qa_tiles};
        if (arch->proj_in_norms) {
            /* 2.2 (model-format §5.2.2) q, k, v = BitLinear(...), one after the other */
            norm_quantize(ctx, k, ctx->x, L->attn_norm, L->q_in, E, T);
            run_matmul(ctx, k, &a, &L->wq, ctx->q, NULL, NULL, NULL, NULL);
            norm_quantize(ctx, k, ctx->h, NULL, L->k_in, E, T);
            run_matmul(ctx, k, &a, &L->wk, ctx->k, NULL, NULL, NULL, NULL);
            norm_quantize(ctx, k, ctx->h, NULL, L->v_in, E, T);
            run_matmul(ctx, k, &a, &L->wv, ctx->v, NULL, NULL, NULL, NULL);
        } else {
            norm_quantize(ctx, k, ctx->x, L->attn_norm, NULL, E, T);
            /* 2.2 (model-format §5.2.2) q, k, v = BitLinear(h, attn_q / attn_k / attn_v) */
            run_matmul(ctx, k, &a, &L->wq, ctx->q, &L->wk, ctx->k, &L->wv, ctx->v);
        }

        /* 2.2a (model-format §10.5.2) QK-norm: RMSNorm of every head of q and k over its D
         * dimensions, before RoPE */
        if (arch->qk_norm)
            for (int32_t i = 0; i < T; i++) {
                for (int32_t hd = 0; hd < hp->n_head; hd++) {
                    float *v = ctx->q + (size_t)i * qd + (size_t)hd * D;
                    rmsnorm(v, L->attn_q_norm, D, eps, v);
                }
                for (int32_t hd = 0; hd < hp->n_head_kv; hd++) {
                    float *v = ctx->k + (size_t)i * kvd + (size_t)hd * D;
                    rmsnorm(v, L->attn_k_norm, D, eps, v);
                }
            }

        /* 2.3 (model-format §5.2.3) RoPE on every head of q and k at the token's position,
         * pairs as the description says (§10.1.3) */
        for (int32_t i = 0; i < T; i++) {
            const size_t rp = (size_t)ctx->tok_pos[i] * (D / 2);
            rope(ctx->q + (size_t)i * qd, hp->n_head, D, ctx->rope_cos + rp, ctx->rope_sin + rp,
                 adjacent);
            rope(ctx->k + (size_t)i * kvd, hp->n_head_kv, D, ctx->rope_cos + rp, ctx->rope_sin + rp,
                 adjacent);
        }

        /* 2.4 (model-format §5.2.4) store k, v at the token's position in its slot's cache of
         * this layer */
        for (int32_t i = 0; i < T; i++) {
            const size_t slot_layer = (size_t)ctx->tok_slot[i] * hp->n_layer + (size_t)l;
            const size_t at = (slot_layer * ctx->n_ctx + (size_t)ctx->tok_pos[i]) * kvd;
            memcpy(ctx->kcache + at, ctx->k + (size_t)i * kvd, (size_t)kvd * sizeof(float));
            memcpy(ctx->vcache + at, ctx->v + (size_t)i * kvd, (size_t)kvd * sizeof(float));
        }

        /* 2.5 (model-format §5.2.5) att = causal attention over positions 0..pos, heads
         * concatenated */
        attn_job aj = {ctx, l, T, {0}};
        bn_queue_init(&aj.queue, (int64_t)T * hp->n_head_kv, bn_pool_threads(ctx->pool), 4, 1);
        bn_pool_run(ctx->pool, attn_worker, &aj);

        /* 2.6 (model-format §5.2.6) RMSNorm(att, attn_sub_norm), quantized; without
         * sub-norms att itself is quantized (§10.1.1) */
        norm_quantize(ctx, k, ctx->att, L->attn_sub_norm, L->o_in, qd, T);
        bn_qact ao = {ctx->qa, qd, T, ctx->qa_s, ctx->qa_sum, ctx->qa_tiles};

        /* 2.7 (model-format §5.2.7) x = x + BitLinear(that, attn_output) */
        run_matmul(ctx, k, &ao, &L->wo, ctx->tmp, NULL, NULL, NULL, NULL);
        add_rows(ctx->x, ctx->tmp, (size_t)T * E);

        /* 2.8 (model-format §5.2.8) h = RMSNorm(x, ffn_norm), quantized once;
         * g, u = BitLinear(h, ffn_gate / ffn_up); with input norms, one quantization each
         * (§10.5.2) */
        if (arch->proj_in_norms) {
            norm_quantize(ctx, k, ctx->x, L->ffn_norm, L->gate_in, E, T);
            run_matmul(ctx, k, &a, &L->w_gate, ctx->g, NULL, NULL, NULL, NULL);
            norm_quantize(ctx, k, ctx->h, NULL, L->up_in, E, T);
            run_matmul(ctx, k, &a, &L->w_up, ctx->u, NULL, NULL, NULL, NULL);
        } else {
            norm_quantize(ctx, k, ctx->x, L->ffn_norm, NULL, E, T);
            run_matmul(ctx, k, &a, &L->w_gate, ctx->g, &L->w_up, ctx->u, NULL, NULL);
        }

        /* 2.9 (model-format §5.2.9) f = max(g, 0)^2 * u (in g), or silu(g) * u (§10.1.2),
         * then RMSNorm(f, ffn_sub_norm) when the graph has it, quantized */
        if (arch->activation == BN_ACT_SILU)
            silu_mul(ctx->g, ctx->u, (size_t)T * F);
        else
            relu_sq_mul(ctx->g, ctx->u, (size_t)T * F);
        norm_quantize(ctx, k, ctx->g, L->ffn_sub_norm, L->down_in, F, T);
        bn_qact af = {ctx->qa, F, T, ctx->qa_s, ctx->qa_sum, ctx->qa_tiles};

        /* 2.10 (model-format §5.2.10) x = x + BitLinear(f, ffn_down) */
        run_matmul(ctx, k, &af, &L->w_down, ctx->tmp, NULL, NULL, NULL, NULL);
        add_rows(ctx->x, ctx->tmp, (size_t)T * E);
    }

    /* 3. (model-format §5.3) y = RMSNorm(x, output_norm) for the tokens that want logits,
     * packed into ynorm; logits = head . y */
    int32_t n_out = 0, first_row = -1;
    for (int32_t i = 0; i < T; i++) {
        /* 3.1 (model-format §5.3.1) tokens that want their hidden state get y itself, no head */
        if (ctx->tok_hrow[i] >= 0)
            rmsnorm(ctx->x + (size_t)i * E, m->output_norm, E, eps,
                    ctx->hidden + (size_t)ctx->tok_hrow[i] * E);
        if (ctx->tok_row[i] < 0)
            continue;
        if (first_row < 0)
            first_row = ctx->tok_row[i];
        rmsnorm(ctx->x + (size_t)i * E, m->output_norm, E, eps, ctx->ynorm + (size_t)n_out * E);
        n_out++;
    }
    if (n_out > 0 && m->head_q2.codes) {
        /* 3.2 (model-format §10.6.3) a Q2_0 head: the rows quantized per token as for any
         * Q2_0 product */
        float *y = ctx->logits + (size_t)first_row * hp->n_vocab;
        norm_quantize(ctx, k, ctx->ynorm, NULL, NULL, E, n_out);
        bn_qact ay = {ctx->qa, E, n_out, ctx->qa_s, ctx->qa_sum, ctx->qa_tiles};
        run_matmul(ctx, k, &ay, &m->head_q2, y, NULL, NULL, NULL, NULL);
    } else if (n_out > 0) {
        float *y = ctx->logits + (size_t)first_row * hp->n_vocab;
        /* F16, or Q8_0 in the F16 head's order (§10.1.6) */
        head_job hj = {k, m->head, m->head_q8, E, hp->n_vocab, n_out, ctx->ynorm, y, {0}};
        bn_queue_init(&hj.queue, hp->n_vocab, bn_pool_threads(ctx->pool), 4, 16);
        bn_pool_run(ctx->pool, head_worker, &hj);
    }
}

/* ---------------------------------------------------------------------------- test entry points */
/* The engine's own per-token steps, called on caller-given arrays, for tests that compare
 * them with the plain references of reference.c (bitnet.h, "test-only"). */

int bn_test_rmsnorm(const float *x, const float *w, int32_t n, float eps, float *out)
{
    if (!x || !w || !out || n <= 0)
        return -1;
    rmsnorm(x, w, n, eps, out);
    return 0;
}

int bn_test_rope(float *v, int32_t n_heads, int32_t head_dim, int32_t pos, float base,
                 const bn_rope_scaling *scaling, int32_t adjacent)
{
    if (!v || n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || pos < 0 ||
        (scaling && (scaling->type < BN_ROPE_SCALING_NONE || scaling->type > BN_ROPE_SCALING_YARN)))
        return -1;
    float *angles = malloc((size_t)head_dim * sizeof(float));
    if (!angles)
        return -1;
    bn_rope_angles(pos, head_dim, base, scaling, angles, angles + head_dim / 2);
    rope(v, n_heads, head_dim, angles, angles + head_dim / 2, adjacent != 0);
    free(angles);
    return 0;
}

int bn_test_attention(const float *q, const float *k, const float *v, int32_t n_pos, int32_t n_head,
                      int32_t n_head_kv, int32_t head_dim, float *out)
{
    if (!q || !k || !v || !out || n_pos <= 0 || n_head <= 0 || n_head_kv <= 0 ||
        n_head % n_head_kv != 0 || n_head / n_head_kv > 64 || head_dim <= 0)
        return -1;
    const int32_t group = n_head / n_head_kv;
    const size_t kvd = (size_t)n_head_kv * head_dim;
    float *scores = malloc((size_t)group * (size_t)n_pos * sizeof(float));
    if (!scores)
        return -1;
    /* as attn_worker does for one token at position n_pos - 1 */
    const float inv_sqrt_d = 1.0f / sqrtf((float)head_dim);
    for (int32_t kh = 0; kh < n_head_kv; kh++) {
        const size_t q_off = (size_t)kh * group * head_dim;
        attend_group(q + q_off, k + (size_t)kh * head_dim, v + (size_t)kh * head_dim, kvd,
                     n_pos - 1, head_dim, group, inv_sqrt_d, scores, (size_t)n_pos, out + q_off);
    }
    free(scores);
    return 0;
}
