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

/* model-format §5.2.3: in every head, the pair (x[i], x[i + D/2]) turns by
 * theta_i = pos * base^(-2i/D) (NeoX pairing); theta in double, its cos and sin rounded to
 * float. */
int bn_ref_rope(float *v, int32_t n_heads, int32_t head_dim, int32_t pos, float base)
{
    if (!v || n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 || pos < 0)
        return -1;
    const int32_t half = head_dim / 2;
    for (int32_t h = 0; h < n_heads; h++) {
        float *x = v + (size_t)h * head_dim;
        for (int32_t i = 0; i < half; i++) {
            const double theta = (double)pos * pow((double)base, -2.0 * i / head_dim);
            const float c = (float)cos(theta), s = (float)sin(theta);
            const float a = x[i], b = x[i + half];
            x[i] = a * c - b * s;
            x[i + half] = a * s + b * c;
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
