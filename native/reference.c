/* reference.c - plain scalar references for RMSNorm, RoPE and causal attention, written
 * straight from model-format §5.2 with simple loops. Used only by tests (bn_ref_* in
 * bitnet.h), which check that the engine's versions in forward.c give the same bits.
 *
 * Floating-point addition is not associative, and the engine's determinism rests on fixed
 * summation orders: where forward.c sums with 8 partial sums and a fixed tree (dot_fixed),
 * the reference sums in that same order (dot8 below), so the two can be compared bit for bit.
 * Every other sum here runs left to right, as the engine's do. Divisions by a norm or a sum
 * are written as a multiplication by its reciprocal, as the engine computes them.
 */
#include <math.h>
#include <stdlib.h>

#include "bitnet.h"

/* sum of a[i] * b[i]: element i goes to partial sum i % 8, the elements after the last whole
 * 8 to partial sum 0; then ((p0 + p4) + (p2 + p6)) + ((p1 + p5) + (p3 + p7)). */
static float dot8(const float *a, const float *b, int32_t n)
{
    float p[8] = {0};
    const int32_t whole = n / 8 * 8;
    for (int32_t i = 0; i < n; i++)
        p[i < whole ? i % 8 : 0] += a[i] * b[i];
    return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

/* model-format §5.2.1: out_i = w_i * x_i / sqrt(mean(x^2) + eps) */
int bn_ref_rmsnorm(const float *x, const float *w, int32_t n, float eps, float *out)
{
    if (!x || !w || !out || n <= 0)
        return -1;
    const float mean_sq = dot8(x, x, n) / (float)n;
    const float inv_rms = 1.0f / sqrtf(mean_sq + eps);
    for (int32_t i = 0; i < n; i++)
        out[i] = w[i] * (x[i] * inv_rms);
    return 0;
}

/* model-format §5.2.3: in every head, the pair (x[i], x[i + D/2]) (NeoX pairing; with
 * adjacent pairing (x[2i], x[2i + 1]), §10.4.1) turns by theta_i = pos * base^(-2i/D); with
 * scaling, §5.2.3.1: linear divides theta_i by the factor, yarn blends theta_i / factor and
 * theta_i by a ramp over the pair index between the two YaRN bounds, and cos and sin are
 * multiplied by attn_factor (yarn: times 1 + 0.1 ln factor). theta, cos and sin in double,
 * rounded to float at the end. */
int bn_ref_rope(float *v, int32_t n_heads, int32_t head_dim, int32_t pos, float base,
                const bn_rope_scaling *scaling, int32_t adjacent)
{
    if (!v || n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || pos < 0 ||
        (scaling && (scaling->type < BN_ROPE_SCALING_NONE || scaling->type > BN_ROPE_SCALING_YARN)))
        return -1;
    const int32_t half = head_dim / 2;
    const int32_t type = scaling ? scaling->type : BN_ROPE_SCALING_NONE;
    for (int32_t h = 0; h < n_heads; h++) {
        float *x = v + (size_t)h * head_dim;
        for (int32_t i = 0; i < half; i++) {
            const double theta_e = (double)pos * pow((double)base, -2.0 * i / head_dim);
            double theta = theta_e, m = scaling ? (double)scaling->attn_factor : 1.0;
            if (type == BN_ROPE_SCALING_LINEAR)
                theta = theta_e / (double)scaling->factor;
            if (type == BN_ROPE_SCALING_YARN) {
                const double f = (double)scaling->factor;
                const double ln_base2 = 2.0 * log((double)base);
                const double orig = (double)scaling->orig_ctx;
                /* the pair index that turns n full circles over the original context */
                double lo = head_dim *
                            log(orig / ((double)scaling->beta_fast * 6.283185307179586476925)) /
                            ln_base2;
                double hi = head_dim *
                            log(orig / ((double)scaling->beta_slow * 6.283185307179586476925)) /
                            ln_base2;
                lo = floor(lo);
                if (lo < 0.0)
                    lo = 0.0;
                hi = ceil(hi);
                if (hi > head_dim - 1)
                    hi = head_dim - 1;
                const double width = hi - lo > 0.001 ? hi - lo : 0.001;
                double ramp = (i - lo) / width;
                ramp = ramp < 0.0 ? 0.0 : ramp > 1.0 ? 1.0 : ramp;
                const double r = 1.0 - ramp; /* share of the unscaled angle */
                theta = theta_e / f * (1.0 - r) + theta_e * r;
                m = m * (1.0 + 0.1 * log(f));
            }
            const float c = (float)(cos(theta) * m), s = (float)(sin(theta) * m);
            float *a = adjacent ? &x[2 * i] : &x[i];
            float *b = adjacent ? &x[2 * i + 1] : &x[i + half];
            const float av = *a, bv = *b;
            *a = av * c - bv * s;
            *b = av * s + bv * c;
        }
    }
    return 0;
}

/* model-format §5.2.5 for one token at position n_pos - 1: query head h uses kv head h / group;
 * score_t = (q . k_t) / sqrt(D) for t = 0..n_pos-1, p = softmax(score) (max subtracted, exp,
 * sum in position order), out = sum_t p_t v_t. k and v rows are [n_head_kv][head_dim]. */
int bn_ref_attention(const float *q, const float *k, const float *v, int32_t n_pos, int32_t n_head,
                     int32_t n_head_kv, int32_t head_dim, float *out)
{
    if (!q || !k || !v || !out || n_pos <= 0 || n_head <= 0 || n_head_kv <= 0 ||
        n_head % n_head_kv != 0 || head_dim <= 0)
        return -1;
    float *p = malloc((size_t)n_pos * sizeof(float));
    if (!p)
        return -1;
    const int32_t group = n_head / n_head_kv;
    const size_t kv_row = (size_t)n_head_kv * head_dim;
    const float inv_sqrt_d = 1.0f / sqrtf((float)head_dim);
    for (int32_t h = 0; h < n_head; h++) {
        const float *qh = q + (size_t)h * head_dim;
        const size_t kv_off = (size_t)(h / group) * head_dim;
        float max = -INFINITY;
        for (int32_t t = 0; t < n_pos; t++) {
            p[t] = dot8(qh, k + t * kv_row + kv_off, head_dim) * inv_sqrt_d;
            if (p[t] > max)
                max = p[t];
        }
        float sum = 0.0f;
        for (int32_t t = 0; t < n_pos; t++) {
            p[t] = expf(p[t] - max);
            sum += p[t];
        }
        const float inv_sum = 1.0f / sum;
        for (int32_t d = 0; d < head_dim; d++) {
            float acc = 0.0f;
            for (int32_t t = 0; t < n_pos; t++)
                acc += p[t] * v[t * kv_row + kv_off + d];
            out[(size_t)h * head_dim + d] = acc * inv_sum;
        }
    }
    free(p);
    return 0;
}
