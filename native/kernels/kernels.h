/* kernels.h - internal: the compute kernels behind the forward pass and bn_ternary_matmul,
 * one kernel set per instruction set in native/kernels/ (scalar.c, x86_avx2.c, x86_avx512.c,
 * x86_amx.c) and dispatch.c choosing among them at run time.
 *
 * Every kernel set computes bit-identical results:
 * - BitLinear accumulates exact int32 dot products of 2-bit codes with int8 activations, and
 *   the float epilogue is the same scalar expression everywhere (bitlinear_out);
 * - the F16 head uses one canonical float order: 16 partial sums, lane l taking elements
 *   l, l+16, l+32, ... with fused multiply-adds, then the fixed tree of sum16 (scalar.c);
 * - the Q8_0 head is the F16 head's order over the weights w = q * d, each exact in f32
 *   (q an int8 of 8 bits times an F16 d of 11 significant bits: at most 19 bits);
 * - Q2_0 sums exact int32 block sums the same way, block g into lane g % 16 (Q2_0_LANES);
 * - quantization rounds half to even (the default rounding mode) and clamps to -128..127.
 * The order never depends on the row range, the thread count or the other tokens in a batch.
 *
 * I2_S memory layout (model-format §4): row r of an I2_S matrix is n_in/4 bytes, 32-byte blocks
 * of 128 weights; element j of a block sits in byte j%32 at shift 6-2*(j/32), code 0..2
 * standing for -1..1. So the four 2-bit planes of a 32-byte block line up with four
 * consecutive 32-byte runs of activations, and sum(code*q) - sum(q) is the ternary dot product.
 *
 * The SIMD files compile every function with __attribute__((target(...))), so each file builds
 * with generic flags and a set is used only after CPU detection has found it supported.
 */
#ifndef BITNET_KERNELS_H
#define BITNET_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../model.h"

#if defined(__x86_64__) || defined(__i386__)
#define BN_X86 1
#include <immintrin.h>
#endif
/* AMX: intrinsics from GCC 11 / clang 12 on, and a Linux system call to enable the tiles. */
#if defined(__x86_64__) && defined(__linux__) && (__GNUC__ >= 11 || __clang_major__ >= 12)
#define BN_HAVE_AMX 1
#endif

/* int8-quantized activations of n_tok tokens (model-format §5.4.1-§5.4.2). */
typedef struct {
    const int8_t *q; /* n_tok rows of stride bytes; stride % 32 == 0 */
    int32_t stride;
    int32_t n_tok;
    const float *s;      /* per token: 127 / max(max|x|, 1e-5) */
    const int32_t *qsum; /* per token: sum of q */
    const int8_t *tiles; /* the kernel set's prepare() output, or NULL */
} bn_qact;

typedef struct {
    const char *name;
    /* q[i] = clamp(round_half_even(x[i] * s)), *s_out = s, *qsum = sum q; n % 32 == 0. */
    void (*quantize)(const float *x, int32_t n, int8_t *q, float *s_out, int32_t *qsum);
    /* Optional (NULL if unused): rearrange the quantized rows of all n_tok tokens once per
     * matrix input, into `tiles` (n_tok * n_in bytes), before the ternary calls. */
    void (*prepare)(const int8_t *q, int32_t stride, int32_t n_in, int32_t n_tok, int8_t *tiles);
    /* y[t * y_stride + r] = BitLinear for rows r0 <= r < r1 of w, every token of a. */
    void (*ternary)(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a, float *y,
                    int64_t y_stride);
    /* The same for a Q2_0 matrix (w->fmt == BN_WFMT_Q2_0), from the activations a->q as
     * q2_0_quantize stores them (a->tiles unused); the float order of Q2_0_LANES. */
    void (*q2_0)(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a, float *y,
                 int64_t y_stride);
    /* quantize's values in the layout the set's q2_0 reads: natural for scalar, chunks of
     * 16 blocks rearranged for the AVX2 and AVX-512 sets (x86_avx512.c). */
    void (*q2_0_quantize)(const float *x, int32_t n, int8_t *q, float *s_out, int32_t *qsum);
    /* y[t * y_stride + r] = dot(F16 row r of w, x + t * x_stride) for r0 <= r < r1;
     * n_in % 16 == 0. */
    void (*f16_matmul)(const uint16_t *w, int32_t n_in, int32_t r0, int32_t r1, const float *x,
                       int32_t n_tok, int64_t x_stride, float *y, int64_t y_stride);
    /* The same for a Q8_0 matrix (rows of n_in/32 blocks of BN_Q8_0_BLOCK bytes; n_in % 32 ==
     * 0) in the F16 head's order with w = q * d (model-format §5.3). */
    void (*q8_0_matmul)(const uint8_t *w, int32_t n_in, int32_t r0, int32_t r1, const float *x,
                        int32_t n_tok, int64_t x_stride, float *y, int64_t y_stride);
} bn_kernel_set;

/* The quantizer whose layout the kernel of weight format fmt reads: Q2_0 kernels read
 * q2_0_quantize's (model-format §10.6.2), I2_S ones quantize's plus prepare's tiles. */
typedef void (*bn_quantize_fn)(const float *x, int32_t n, int8_t *q, float *s_out, int32_t *qsum);
static inline bn_quantize_fn bn_quantizer(const bn_kernel_set *k, uint8_t fmt)
{
    return fmt == BN_WFMT_Q2_0 ? k->q2_0_quantize : k->quantize;
}

/* Whether activations for weight format fmt go through k->prepare (I2_S only: Q2_0 kernels
 * read the quantizer's layout itself). */
static inline int bn_uses_tiles(const bn_kernel_set *k, uint8_t fmt)
{
    return k->prepare != NULL && fmt == BN_WFMT_I2_S;
}

/* Rows r0..r1 of w for every token of a, with the kernel of w's weight format. */
static inline void bn_weights_rows(const bn_kernel_set *k, const bn_ternary *w, int32_t r0,
                                   int32_t r1, const bn_qact *a, float *y, int64_t y_stride)
{
    (w->fmt == BN_WFMT_Q2_0 ? k->q2_0 : k->ternary)(w, r0, r1, a, y, y_stride);
}

/* The selected kernel set (CPU detection on first use, or bn_kernel_select). */
const bn_kernel_set *bn_kernels(void);
/* A kernel set by name, NULL if unknown or not supported by this CPU. */
const bn_kernel_set *bn_kernels_by_name(const char *name);

/* F16 (IEEE binary16 bits) to F32, exact. */
float bn_f16_to_f32(uint16_t h);
/* Convert n F16 values (row of the embedding) to F32 with the fastest available path. */
void bn_f16_row_to_f32(const uint16_t *src, int32_t n, float *dst);

/* ------------------------------------------------------------------ between the kernel files */

/* The kernel sets (dispatch.c picks one). Only scalar exists off x86. */
extern const bn_kernel_set bn_kernels_scalar;
#ifdef BN_X86
extern const bn_kernel_set bn_kernels_avx2;
extern const bn_kernel_set bn_kernels_avx512;
#ifdef BN_HAVE_AMX
extern const bn_kernel_set bn_kernels_amx;
#endif
#endif

/* The BitLinear epilogue, one expression for every kernel (model-format §5.4.3). */
static inline float bitlinear_out(int32_t acc, int32_t qsum, float s, float scale)
{
    return (float)(acc - qsum) / s * scale;
}

/* Q2_0 (model-format §10.6.1): a block of 64 weights is 18 bytes, an F16 scale d then 16
 * bytes of 2-bit codes, weight j of the block at bits 2*(j%4) of byte 2 + j/4 (low bits
 * first), value (code - 1) * d. */
#define BN_Q2_0_BLOCK 18

/* Q8_0 (ggml type 8, model-format §10.1.6): a block of 32 weights is 34 bytes, an F16 scale d
 * then 32 int8 values q, weight j = q[j] * d. */
#define BN_Q8_0_BLOCK 34

/* The 32 weights q * d of one Q8_0 block, each exact in f32 (the values the Q8_0 head
 * multiplies and a Q8_0 embedding row holds). */
static inline void bn_q8_0_block(const uint8_t *block, float w[32])
{
    uint16_t h;
    memcpy(&h, block, sizeof h);
    const float d = bn_f16_to_f32(h);
    const int8_t *q = (const int8_t *)(const void *)(block + 2);
    for (int j = 0; j < 32; j++)
        w[j] = (float)q[j] * d;
}

/* The exact int32 sums isum[g] = sum over block g of (code - 1) * q for n consecutive blocks
 * of a Q2_0 row and the natural-layout activations q of their 64 * n weights. */
typedef void (*q2_0_isums_fn)(const uint8_t *blocks, const int8_t *q, int32_t n, int32_t *isum);

/* The Q2_0 product (model-format §10.6.2) sums a row's blocks into Q2_0_LANES float partial
 * sums, block g into lane g % Q2_0_LANES in ascending g, each step one fused multiply-add
 * (float)isum[g] * d[g] + p; then sum16's tree (scalar.c) and the division by s. Sixteen
 * lanes: one AVX-512 register of lanes, two AVX2 ones, and sixteen independent chains where
 * the single chain of the first definition kept decode at a fifth of the memory speed. The
 * order depends on nothing but the row, so every kernel set and thread count agrees. */
#define Q2_0_LANES 16

/* Rows of one tile are drawn from STREAMS distant parts of the range, so the memory system
 * sees several sequential streams at once (model-format §9). */
#define STREAMS 4

/* Bytes of per-block activation sums a SIMD set keeps for one group of tokens (64 per chunk of
 * 16 blocks and token): the token groups of q2_0_schedule. */
#define Q2_0_QSUM_BYTES 32768

/* One unit of q2_0_schedule: rows rows[k] (row index rr[k]) for k < nr against the nt
 * tokens t0 .. t0 + nt - 1 (acts[j] their activations), whose block sums are entries tg ..
 * tg + nt - 1 of the current token group's. */
typedef struct {
    const uint8_t *rows[STREAMS];
    int32_t rr[STREAMS];
    int nr;
    const int8_t *acts[4];
    int32_t t0, tg;
    int nt;
} q2_0_unit;

/* One Q2_0 product call as q2_0_schedule's units see it (a set's run adds its sums buffer). */
typedef struct {
    const bn_ternary *w;
    const bn_qact *a;
    float *y;
    int64_t y_stride;
    int32_t nch, rem; /* full chunks of 16 blocks per row, blocks after them */
} q2_0_call;

static inline q2_0_call q2_0_call_of(const bn_ternary *w, const bn_qact *a, float *y,
                                     int64_t y_stride)
{
    const int32_t nb = w->n_in / 64;
    return (q2_0_call){w, a, y, y_stride, nb / 16, nb % 16};
}

/* The Q2_0 schedule of the SIMD sets (x86_avx2.c, x86_avx512.c) for rows r0..r1 and every
 * token of a, on inputs in the chunked layout. Tokens go in groups whose block sums fit
 * Q2_0_QSUM_BYTES: sums(ctx, g0, gn) computes a group's. Up to 4 tokens (memory bound), rows
 * are taken 4 at a time from STREAMS distant parts of the range (one sequential stream fell
 * far short of the memory's speed), then one by one for the rest; more tokens (compute
 * bound), one at a time in row blocks of about 256 KiB that stay in L2 while each 4 tokens of
 * the group pass over them, so every activation load comes from L1 (a row at a time over all
 * tokens ran at half the speed from L2). unit(ctx, u) computes and stores one unit. */
static inline void q2_0_schedule(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                                 void (*sums)(void *ctx, int32_t g0, int32_t gn),
                                 void (*unit)(void *ctx, const q2_0_unit *u), void *ctx)
{
    const int32_t nch = w->n_in / 64 / 16;
    const size_t row_bytes = (size_t)(w->n_in / 64) * BN_Q2_0_BLOCK;
    const int32_t rows_block =
        a->n_tok <= 4 ? r1 - r0 : (int32_t)((256 << 10) / row_bytes) + STREAMS;
    const int32_t group = nch ? (int32_t)(Q2_0_QSUM_BYTES / 64 / nch) : a->n_tok;
    q2_0_unit u;
    for (int32_t g0 = 0; g0 < a->n_tok; g0 += group) {
        const int32_t gn = a->n_tok - g0 < group ? a->n_tok - g0 : group;
        sums(ctx, g0, gn);
        for (int32_t rb = r0; rb < r1; rb += rows_block) {
            const int32_t re = r1 - rb < rows_block ? r1 : rb + rows_block;
            const int32_t len = (re - rb) / STREAMS;
            const int32_t nstream = a->n_tok <= 4 ? len : 0;
            for (int32_t t0 = g0; t0 < g0 + gn; t0 += 4) {
                u.t0 = t0;
                u.tg = t0 - g0;
                u.nt = g0 + gn - t0 < 4 ? g0 + gn - t0 : 4;
                for (int j = 0; j < u.nt; j++)
                    u.acts[j] = a->q + (size_t)(t0 + j) * a->stride;
                for (int32_t i = 0; i < nstream + (re - rb - STREAMS * nstream); i++) {
                    u.nr = i < nstream ? STREAMS : 1;
                    for (int k = 0; k < u.nr; k++) {
                        u.rr[k] =
                            u.nr > 1 ? rb + k * len + i : rb + STREAMS * nstream + (i - nstream);
                        u.rows[k] = w->codes + (size_t)u.rr[k] * row_bytes;
                    }
                    unit(ctx, &u);
                }
            }
        }
    }
}

/* The AVX2 and AVX-512 sets' Q2_0 activations (x86_avx512.c) come in chunks of 16 blocks
 * (1024 values) rearranged for their kernels, up to this input width (their block sums then
 * fit a fixed stack buffer); wider inputs keep the natural layout and the AVX2 set's
 * natural-layout kernel. */
#define Q2_0_MAX_TILED (1 << 19)

/* Exact int32 dot product of one I2_S row (codes 0..2, not yet offset by -1) with n_in int8
 * activations in the natural layout (scalar.c; the AMX kernel's odd last block). */
int32_t bn_ternary_dot_scalar(const uint8_t *row, int32_t n_in, const int8_t *q);

#ifdef BN_X86
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) static inline
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define AVX512_INLINE                                                                              \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"),                   \
                   always_inline)) static inline

/* A prefetch hint for base + off bytes. The address may lie past the end of the matrix (the
 * "next row" of its last row); a prefetch never faults, and integer arithmetic keeps the C
 * pointer rules out of it. */
static inline void prefetch_at(const void *base, size_t off)
{
    _mm_prefetch((const char *)((uintptr_t)base + off), _MM_HINT_T0);
}

/* Sum of the eight int32 lanes (exact: integer adds). */
AVX2_INLINE int32_t hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* F16 rows times F32 activations in the canonical order: lanes 0-7 of lo and hi are partial
 * sums 0-7 and 8-15 of the canonical order (top of this file); the final reduction is
 * sum16's tree. */
AVX2_INLINE float reduce16_avx2(__m256 lo, __m256 hi)
{
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

/* A BitLinear tile of a fixed number of rows and tokens: out[row * n_tokens + token]. */
typedef void (*ternary_tile_fn)(const uint8_t *const *, const int8_t *const *, int32_t, int32_t *);

/* x86_avx2.c, shared with the AVX-512 and AMX sets */
AVX2_FN void bn_quantize_avx2(const float *x, int32_t n, int8_t *q, float *s_out, int32_t *qsum);
/* One row times one token's activations (natural layout) over nb blocks: *out = sum(code*q). */
AVX2_FN void bn_ternary_tile_avx2_1x1(const uint8_t *const *rows, const int8_t *const *acts,
                                      int32_t nb, int32_t *out);
AVX2_FN void bn_f16_row_avx2(const uint16_t *src, int32_t n, float *dst);
AVX2_FN void bn_q2_0_avx2(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a, float *y,
                          int64_t y_stride);
/* The Q2_0 block sums of n blocks (natural-layout activations), for the AVX-512 tail. */
AVX2_FN void bn_q2_0_isums_avx2(const uint8_t *blocks, const int8_t *q, int32_t n, int32_t *isum);
/* x86_avx512.c, shared with the AMX set */
AVX512_FN void bn_quantize_avx512(const float *x, int32_t n, int8_t *q, float *s_out,
                                  int32_t *qsum);
AVX512_FN void bn_ternary_avx512(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                                 float *y, int64_t y_stride);
/* Q2_0: activations in chunks of 16 blocks, and the kernel reading them (x86_avx512.c). */
AVX512_FN void bn_q2_0_quantize_avx512(const float *x, int32_t n, int8_t *q, float *s_out,
                                       int32_t *qsum);
AVX512_FN void bn_q2_0_avx512(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                              float *y, int64_t y_stride);
AVX512_FN void bn_f16_matmul_avx512(const uint16_t *w, int32_t n_in, int32_t r0, int32_t r1,
                                    const float *x, int32_t n_tok, int64_t x_stride, float *y,
                                    int64_t y_stride);
AVX512_FN void bn_q8_0_matmul_avx512(const uint8_t *w, int32_t n_in, int32_t r0, int32_t r1,
                                     const float *x, int32_t n_tok, int64_t x_stride, float *y,
                                     int64_t y_stride);
#endif /* BN_X86 */

#endif
