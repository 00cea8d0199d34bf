/* kernels.h - internal: the compute kernels behind the forward pass and bn_ternary_matmul.
 *
 * Every kernel set computes bit-identical results:
 * - BitLinear accumulates exact int32 dot products of 2-bit codes with int8 activations, and
 *   the float epilogue is the same scalar expression everywhere;
 * - the F16 head uses one canonical float order: 16 partial sums, lane l taking elements
 *   l, l+16, l+32, ... with fused multiply-adds, then the fixed tree of bn_sum16;
 * - quantization rounds half to even (the default rounding mode) and clamps to -128..127.
 * The order never depends on the row range, the thread count or the other tokens in a batch.
 */
#ifndef BITNET_KERNELS_H
#define BITNET_KERNELS_H

#include <stdint.h>

#include "model.h"

/* int8-quantized activations of n_tok tokens (spec section 5, BitLinear steps 1-2). */
typedef struct {
    const int8_t *q;       /* n_tok rows of stride bytes; stride % 32 == 0 */
    int32_t stride;
    int32_t n_tok;
    const float *s;        /* per token: 127 / max(max|x|, 1e-5) */
    const int32_t *qsum;   /* per token: sum of q */
    const int8_t *tiles;   /* the kernel set's prepare() output, or NULL */
} bn_qact;

typedef struct {
    const char *name;
    /* q[i] = clamp(round_half_even(x[i] * s)), *s_out = s, *qsum = sum q; n % 32 == 0. */
    void (*quantize)(const float *x, int32_t n, int8_t *q, float *s_out, int32_t *qsum);
    /* Optional (NULL if unused): rearrange the quantized rows of all n_tok tokens once per
     * matrix input, into `tiles` (n_tok * n_in bytes), before the ternary calls. */
    void (*prepare)(const int8_t *q, int32_t stride, int32_t n_in, int32_t n_tok,
                    int8_t *tiles);
    /* y[t * y_stride + r] = BitLinear for rows r0 <= r < r1 of w, every token of a. */
    void (*ternary)(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                    float *y, int64_t y_stride);
    /* y[t * y_stride + r] = dot(F16 row r of w, x + t * x_stride) for r0 <= r < r1;
     * n_in % 16 == 0. */
    void (*f16_matmul)(const uint16_t *w, int32_t n_in, int32_t r0, int32_t r1,
                       const float *x, int32_t n_tok, int64_t x_stride, float *y, int64_t y_stride);
} bn_kernel_set;

/* The selected kernel set (CPU detection on first use, or bn_kernel_select). */
const bn_kernel_set *bn_kernels(void);
/* A kernel set by name, NULL if unknown or not supported by this CPU. */
const bn_kernel_set *bn_kernels_by_name(const char *name);

/* F16 (IEEE binary16 bits) to F32, exact. */
float bn_f16_to_f32(uint16_t h);
/* Convert n F16 values (row of the embedding) to F32 with the fastest available path. */
void bn_f16_row_to_f32(const uint16_t *src, int32_t n, float *dst);

#endif
