/* scalar.c - the portable kernel set "scalar": plain C loops that every other set must match
 * bit for bit, plus the exact F16 -> F32 conversion. Runs on any CPU.
 */
#include <math.h>
#include <string.h>

#include "kernels.h"

float bn_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        /* inf / nan; a NaN comes out quiet, as F16C converts it */
        bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13); /* normal: rebias 15 -> 127 */
    } else if (mant == 0) {
        bits = sign; /* signed zero */
    } else {
        /* subnormal: value = mant * 2^-24, normalise */
        uint32_t e = 113; /* exponent of 2^-14 rebiased, decremented while shifting */
        while ((mant & 0x400u) == 0) {
            mant <<= 1;
            e--;
        }
        bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The canonical reduction of 16 partial sums. */
static inline float sum16(const float p[16])
{
    float s8[8], s4[4];
    for (int l = 0; l < 8; l++)
        s8[l] = p[l] + p[l + 8];
    for (int l = 0; l < 4; l++)
        s4[l] = s8[l] + s8[l + 4];
    float s2a = s4[0] + s4[2], s2b = s4[1] + s4[3];
    return s2a + s2b;
}

static void quantize_scalar(const float *x, int32_t n, int8_t *q, float *s_out, int32_t *qsum)
{
    float m = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (a > m)
            m = a;
    }
    if (m < 1e-5f)
        m = 1e-5f;
    const float s = 127.0f / m;
    int32_t sum = 0;
    for (int32_t i = 0; i < n; i++) {
        long v = lrintf(x[i] * s); /* round half to even in the default rounding mode */
        if (v < -128)
            v = -128;
        if (v > 127)
            v = 127;
        q[i] = (int8_t)v;
        sum += (int32_t)v;
    }
    *s_out = s;
    *qsum = sum;
}

int32_t bn_ternary_dot_scalar(const uint8_t *row, int32_t n_in, const int8_t *q)
{
    int32_t acc = 0;
    for (int32_t b = 0; b < n_in / 128; b++) {
        const uint8_t *c = row + 32 * b;
        const int8_t *a = q + 128 * b;
        for (int p = 0; p < 32; p++) {
            int32_t byte = c[p];
            acc += ((byte >> 6) & 3) * a[p] + ((byte >> 4) & 3) * a[32 + p] +
                   ((byte >> 2) & 3) * a[64 + p] + (byte & 3) * a[96 + p];
        }
    }
    return acc;
}

static void ternary_scalar(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a, float *y,
                           int64_t y_stride)
{
    const size_t row_bytes = (size_t)w->n_in / 4;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + (size_t)r * row_bytes;
        for (int32_t t = 0; t < a->n_tok; t++) {
            int32_t acc = bn_ternary_dot_scalar(row, w->n_in, a->q + (size_t)t * a->stride);
            y[t * y_stride + r] = bitlinear_out(acc, a->qsum[t], a->s[t], w->scale);
        }
    }
}

/* Q2_0 block sums (model-format §10.6.2), one weight at a time. */
static void q2_0_isums_scalar(const uint8_t *blocks, const int8_t *q, int32_t n, int32_t *isum)
{
    for (int32_t g = 0; g < n; g++) {
        const uint8_t *qs = blocks + (size_t)g * BN_Q2_0_BLOCK + 2;
        const int8_t *x = q + (size_t)g * 64;
        int32_t sum = 0;
        for (int j = 0; j < 64; j++)
            sum += (((qs[j / 4] >> (2 * (j % 4))) & 3) - 1) * x[j];
        isum[g] = sum;
    }
}

/* The reference order of model-format §10.6.2: block g into lane g % 16 with a fused
 * multiply-add, then sum16. */
static void q2_0_scalar(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a, float *y,
                        int64_t y_stride)
{
    const int32_t nb = w->n_in / 64;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + (size_t)r * (size_t)nb * BN_Q2_0_BLOCK;
        for (int32_t t = 0; t < a->n_tok; t++) {
            const int8_t *q = a->q + (size_t)t * a->stride;
            float p[Q2_0_LANES] = {0};
            for (int32_t g = 0; g < nb; g++) {
                const uint8_t *block = row + (size_t)g * BN_Q2_0_BLOCK;
                int32_t isum;
                q2_0_isums_scalar(block, q + (size_t)g * 64, 1, &isum);
                uint16_t h;
                memcpy(&h, block, sizeof h);
                p[g % Q2_0_LANES] = fmaf((float)isum, bn_f16_to_f32(h), p[g % Q2_0_LANES]);
            }
            y[t * y_stride + r] = sum16(p) / a->s[t];
        }
    }
}

static void f16_matmul_scalar(const uint16_t *w, int32_t n_in, int32_t r0, int32_t r1,
                              const float *x, int32_t n_tok, int64_t x_stride, float *y,
                              int64_t y_stride)
{
    for (int32_t r = r0; r < r1; r++) {
        const uint16_t *row = w + (size_t)r * n_in;
        for (int32_t t = 0; t < n_tok; t++) {
            const float *xt = x + t * x_stride;
            float p[16] = {0};
            for (int32_t i = 0; i < n_in; i += 16)
                for (int l = 0; l < 16; l++)
                    p[l] = fmaf(bn_f16_to_f32(row[i + l]), xt[i + l], p[l]);
            y[t * y_stride + r] = sum16(p);
        }
    }
}

/* The Q8_0 head (model-format §5.3): the F16 head's lanes over w = q * d. The product is exact
 * in f32 (8 bits of q times 11 of d), so the only roundings are the fused multiply-adds and
 * sum16's tree, as for an F16 row; element b*32 + j falls in lane j % 16. */
static void q8_0_matmul_scalar(const uint8_t *w, int32_t n_in, int32_t r0, int32_t r1,
                               const float *x, int32_t n_tok, int64_t x_stride, float *y,
                               int64_t y_stride)
{
    const int32_t nb = n_in / 32;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w + (size_t)r * (size_t)nb * BN_Q8_0_BLOCK;
        for (int32_t t = 0; t < n_tok; t++) {
            const float *xt = x + t * x_stride;
            float p[16] = {0};
            for (int32_t b = 0; b < nb; b++) {
                float wb[32];
                bn_q8_0_block(row + (size_t)b * BN_Q8_0_BLOCK, wb);
                for (int j = 0; j < 32; j++)
                    p[j % 16] = fmaf(wb[j], xt[b * 32 + j], p[j % 16]);
            }
            y[t * y_stride + r] = sum16(p);
        }
    }
}

const bn_kernel_set bn_kernels_scalar = {
    .name = "scalar",
    .quantize = quantize_scalar,
    .prepare = NULL,
    .ternary = ternary_scalar,
    .q2_0 = q2_0_scalar,
    .q2_0_quantize = quantize_scalar,
    .f16_matmul = f16_matmul_scalar,
    .q8_0_matmul = q8_0_matmul_scalar,
};
