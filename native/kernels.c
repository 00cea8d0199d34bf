/* kernels.c - BitLinear (I2_S ternary x int8), the F16 head and quantization.
 *
 * Two kernel sets with identical results: "scalar" (portable reference) and "avx2"
 * (AVX2 + FMA + F16C, compiled per function with target attributes so the file builds with
 * generic flags; chosen at run time). See kernels.h for the exactness rules.
 *
 * Memory layout (spec section 4): row r of an I2_S matrix is n_in/4 bytes, 32-byte blocks of
 * 128 weights; element j of a block sits in byte j%32 at shift 6-2*(j/32), code 0..2 standing
 * for -1..1. So the four 2-bit planes of a 32-byte block line up with four consecutive 32-byte
 * runs of activations, and sum(code*q) - sum(q) is the ternary dot product.
 */
#define _GNU_SOURCE  /* syscall() for the AMX permission request */
#include "kernels.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "threadpool.h"

#if defined(__x86_64__) || defined(__i386__)
#define BN_X86 1
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------ shared scalar pieces */

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
        bits = sign | ((exp + 112) << 23) | (mant << 13);  /* normal: rebias 15 -> 127 */
    } else if (mant == 0) {
        bits = sign;                                        /* signed zero */
    } else {
        /* subnormal: value = mant * 2^-24, normalise */
        uint32_t e = 113;  /* exponent of 2^-14 rebiased, decremented while shifting */
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

/* The BitLinear epilogue, one expression for every kernel (spec section 5 step 3). */
static inline float bitlinear_out(int32_t acc, int32_t qsum, float s, float scale)
{
    return (float)(acc - qsum) / s * scale;
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

/* ------------------------------------------------------------------ scalar reference */

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
        long v = lrintf(x[i] * s);  /* round half to even in the default rounding mode */
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

static int32_t ternary_dot_scalar(const uint8_t *row, int32_t n_in, const int8_t *q)
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

static void ternary_scalar(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                           float *y, int64_t y_stride)
{
    const size_t row_bytes = (size_t)w->n_in / 4;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + (size_t)r * row_bytes;
        for (int32_t t = 0; t < a->n_tok; t++) {
            int32_t acc = ternary_dot_scalar(row, w->n_in, a->q + (size_t)t * a->stride);
            y[t * y_stride + r] = bitlinear_out(acc, a->qsum[t], a->s[t], w->scale);
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

static const bn_kernel_set scalar_set = {
    "scalar", quantize_scalar, NULL, ternary_scalar, f16_matmul_scalar,
};

/* ------------------------------------------------------------------ AVX2 */
#ifdef BN_X86
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE __attribute__((target("avx2,fma,f16c"), always_inline)) static inline

AVX2_FN static void quantize_avx2(const float *x, int32_t n, int8_t *q, float *s_out,
                                  int32_t *qsum)
{
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps();
    for (int32_t i = 0; i < n; i += 8) {
        /* max_ps(a, b) = a > b ? a : b, the scalar comparison; NaNs never enter mx */
        mx = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), absmask), mx);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, mx);
    float m = 0.0f;
    for (int l = 0; l < 8; l++)
        if (lanes[l] > m)
            m = lanes[l];
    if (m < 1e-5f)
        m = 1e-5f;
    const float s = 127.0f / m;
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i one8 = _mm256_set1_epi8(1);
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i sum = _mm256_setzero_si256();
    for (int32_t i = 0; i < n; i += 32) {
        /* cvtps rounds with the current mode (nearest even), as lrintf does */
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), vs));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8), vs));
        __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 16), vs));
        __m256i d = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 24), vs));
        /* saturating packs clamp to -128..127; they interleave 128-bit lanes, perm undoes it */
        __m256i ab = _mm256_packs_epi32(a, b);
        __m256i cd = _mm256_packs_epi32(c, d);
        __m256i v = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), perm);
        _mm256_storeu_si256((__m256i *)(q + i), v);
        sum = _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(one8, v), one16));
    }
    int32_t sl[8];
    _mm256_storeu_si256((__m256i *)sl, sum);
    *s_out = s;
    *qsum = sl[0] + sl[1] + sl[2] + sl[3] + sl[4] + sl[5] + sl[6] + sl[7];
}

/* A prefetch hint for base + off bytes. The address may lie past the end of the matrix (the
 * "next row" of its last row); a prefetch never faults, and integer arithmetic keeps the C
 * pointer rules out of it. */
static inline void prefetch_at(const void *base, size_t off)
{
    _mm_prefetch((const char *)((uintptr_t)base + off), _MM_HINT_T0);
}

AVX2_INLINE int32_t hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* Integer dot products of nr rows with nt token activations over nb blocks.
 * maddubs(code, act) adds two products of magnitude <= 3*128 (code 3 never occurs in a valid
 * file, but is bounded anyway): <= 768 per int16 lane; four planes give <= 3072 per block,
 * and GROUP = 8 blocks <= 24576 < 32767 before widening to int32 with madd. */
#define GROUP 8
AVX2_INLINE void ternary_tile_avx2(const uint8_t *const *rows, const int nr,
                                   const int8_t *const *acts, const int nt, int32_t nb,
                                   int32_t *out)
{
    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4];
    for (int k = 0; k < nr * nt; k++)
        acc[k] = _mm256_setzero_si256();
    for (int32_t g = 0; g < nb; g += GROUP) {
        const int32_t ge = g + GROUP < nb ? g + GROUP : nb;
        __m256i s16[4];
        for (int k = 0; k < nr * nt; k++)
            s16[k] = _mm256_setzero_si256();
        for (int32_t b = g; b < ge; b++) {
            for (int i = 0; i < nr; i++) {
                if ((b & 1) == 0)  /* the same line of the stream's next row (see avx512) */
                    prefetch_at(rows[i], 32 * (size_t)b + (size_t)nb * 32);
                const __m256i c = _mm256_loadu_si256((const __m256i *)(rows[i] + 32 * b));
                const __m256i p0 = _mm256_and_si256(_mm256_srli_epi16(c, 6), m3);
                const __m256i p1 = _mm256_and_si256(_mm256_srli_epi16(c, 4), m3);
                const __m256i p2 = _mm256_and_si256(_mm256_srli_epi16(c, 2), m3);
                const __m256i p3 = _mm256_and_si256(c, m3);
                for (int j = 0; j < nt; j++) {
                    const int8_t *a = acts[j] + 128 * b;
                    const __m256i *av = (const __m256i *)a;
                    __m256i d0 = _mm256_maddubs_epi16(p0, _mm256_loadu_si256(av));
                    __m256i d1 = _mm256_maddubs_epi16(p1, _mm256_loadu_si256(av + 1));
                    __m256i d2 = _mm256_maddubs_epi16(p2, _mm256_loadu_si256(av + 2));
                    __m256i d3 = _mm256_maddubs_epi16(p3, _mm256_loadu_si256(av + 3));
                    s16[i * nt + j] = _mm256_add_epi16(
                        s16[i * nt + j],
                        _mm256_add_epi16(_mm256_add_epi16(d0, d1), _mm256_add_epi16(d2, d3)));
                }
            }
        }
        for (int k = 0; k < nr * nt; k++)
            acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(s16[k], ones));
    }
    for (int k = 0; k < nr * nt; k++)
        out[k] = hsum_epi32(acc[k]);
}

/* One instantiation per tile shape, so every loop above has constant bounds. */
#define TERNARY_TILE(NR, NT)                                                                  \
    AVX2_FN static void ternary_tile_##NR##x##NT(const uint8_t *const *rows,                   \
                                                 const int8_t *const *acts, int32_t nb,      \
                                                 int32_t *out)                               \
    {                                                                                        \
        ternary_tile_avx2(rows, NR, acts, NT, nb, out);                                      \
    }
TERNARY_TILE(4, 1)
TERNARY_TILE(1, 1)

typedef void (*ternary_tile_fn)(const uint8_t *const *, const int8_t *const *, int32_t,
                                int32_t *);

/* Rows of one tile are drawn from STREAMS distant parts of the range, so the memory system
 * sees several sequential streams at once (spec section 9). */
#define STREAMS 4

AVX2_FN static void ternary_avx2(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                                 float *y, int64_t y_stride)
{
    const size_t row_bytes = (size_t)w->n_in / 4;
    const int32_t nb = w->n_in / 128;
    const int32_t n_tok = a->n_tok;
    const int32_t n = r1 - r0;
    const int32_t len = n / STREAMS;
    int32_t out[4];
    const uint8_t *rows[4];
    const int8_t *acts[4];

    /* 4 rows from 4 streams per tile; for each token the rows' codes come again from L1 */
    for (int32_t i = 0; i < len; i++) {
        int32_t rr[4];
        for (int k = 0; k < 4; k++) {
            rr[k] = r0 + k * len + i;
            rows[k] = w->codes + (size_t)rr[k] * row_bytes;
        }
        for (int32_t t = 0; t < n_tok; t++) {
            acts[0] = a->q + (size_t)t * a->stride;
            ternary_tile_4x1(rows, acts, nb, out);
            for (int k = 0; k < 4; k++)
                y[t * y_stride + rr[k]] = bitlinear_out(out[k], a->qsum[t], a->s[t], w->scale);
        }
    }
    for (int32_t r = r0 + STREAMS * len; r < r1; r++) {
        rows[0] = w->codes + (size_t)r * row_bytes;
        for (int32_t t = 0; t < n_tok; t++) {
            acts[0] = a->q + (size_t)t * a->stride;
            ternary_tile_1x1(rows, acts, nb, out);
            y[t * y_stride + r] = bitlinear_out(out[0], a->qsum[t], a->s[t], w->scale);
        }
    }
}

/* F16 rows times F32 activations in the canonical order: lanes 0-7 of lo and hi are partial
 * sums 0-7 and 8-15 of kernels.h; the final reduction is sum16's tree. */
AVX2_INLINE float reduce16_avx2(__m256 lo, __m256 hi)
{
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    __m128 s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    return _mm_cvtss_f32(s1);
}

AVX2_INLINE void f16_tile_avx2(const uint16_t *const *rows, const int nr,
                               const float *const *xs, const int nt, int32_t n_in, float *out)
{
    __m256 lo[4], hi[4];
    for (int k = 0; k < nr * nt; k++) {
        lo[k] = _mm256_setzero_ps();
        hi[k] = _mm256_setzero_ps();
    }
    for (int32_t e = 0; e < n_in; e += 16) {
        for (int i = 0; i < nr; i++) {
            if ((e & 31) == 0)
                prefetch_at(rows[i], 2 * ((size_t)e + (size_t)n_in));
            const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rows[i] + e)));
            const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(rows[i] + e + 8)));
            for (int j = 0; j < nt; j++) {
                const int k = i * nt + j;
                lo[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xs[j] + e), lo[k]);
                hi[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xs[j] + e + 8), hi[k]);
            }
        }
    }
    for (int k = 0; k < nr * nt; k++)
        out[k] = reduce16_avx2(lo[k], hi[k]);
}

#define F16_TILE(NR, NT)                                                                      \
    AVX2_FN static void f16_tile_##NR##x##NT(const uint16_t *const *rows,                      \
                                             const float *const *xs, int32_t n_in, float *out) \
    {                                                                                        \
        f16_tile_avx2(rows, NR, xs, NT, n_in, out);                                          \
    }
F16_TILE(4, 1)
F16_TILE(1, 1)

AVX2_FN static void f16_matmul_avx2(const uint16_t *w, int32_t n_in, int32_t r0, int32_t r1,
                                    const float *x, int32_t n_tok, int64_t x_stride, float *y,
                                    int64_t y_stride)
{
    const int32_t n = r1 - r0;
    const int32_t len = n / STREAMS;
    const uint16_t *rows[4];
    const float *xs[4];
    float out[4];
    for (int32_t i = 0; i < len; i++) {
        int32_t rr[4];
        for (int k = 0; k < 4; k++) {
            rr[k] = r0 + k * len + i;
            rows[k] = w + (size_t)rr[k] * n_in;
        }
        for (int32_t t = 0; t < n_tok; t++) {
            xs[0] = x + t * x_stride;
            f16_tile_4x1(rows, xs, n_in, out);
            for (int k = 0; k < 4; k++)
                y[t * y_stride + rr[k]] = out[k];
        }
    }
    for (int32_t r = r0 + STREAMS * len; r < r1; r++) {
        rows[0] = w + (size_t)r * n_in;
        for (int32_t t = 0; t < n_tok; t++) {
            xs[0] = x + t * x_stride;
            f16_tile_1x1(rows, xs, n_in, out);
            y[t * y_stride + r] = out[0];
        }
    }
}

AVX2_FN static void f16_row_avx2(const uint16_t *src, int32_t n, float *dst)
{
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = bn_f16_to_f32(src[i]);
}

static const bn_kernel_set avx2_set = {
    "avx2", quantize_avx2, NULL, ternary_avx2, f16_matmul_avx2,
};

static int cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

/* ------------------------------------------------------------------ AVX-512 VNNI */
/* vpdpbusd adds four u8*s8 products straight into int32 lanes: no 16-bit intermediate at
 * all. A 512-bit register holds the codes of two blocks; the activations are quantized into
 * a matching "paired" layout (for blocks 2p and 2p+1: plane 0 of both, plane 1 of both, ...),
 * so each plane is one 64-byte load. An odd last block keeps the natural layout and runs
 * with 256-bit instructions. The results are the same exact integers as every other kernel. */
#define AVX512_FN __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define AVX512_INLINE                                                                         \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"),             \
                   always_inline)) static inline

AVX512_FN static void quantize_avx512(const float *x, int32_t n, int8_t *q, float *s_out,
                                      int32_t *qsum)
{
    quantize_avx2(x, n, q, s_out, qsum);
    if (n % 128 != 0)
        return;
    /* natural -> paired layout, two blocks (256 bytes) at a time */
    for (int32_t b = 0; b + 2 <= n / 128; b += 2) {
        int8_t *blk = q + (size_t)b * 128;
        __m256i a[4], c[4];
        for (int k = 0; k < 4; k++) {
            a[k] = _mm256_loadu_si256((const __m256i *)(blk + 32 * k));
            c[k] = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * k));
        }
        for (int k = 0; k < 4; k++) {
            _mm256_storeu_si256((__m256i *)(blk + 64 * k), a[k]);
            _mm256_storeu_si256((__m256i *)(blk + 64 * k + 32), c[k]);
        }
    }
}

AVX512_INLINE void ternary_tile_avx512(const uint8_t *const *rows, const int nr,
                                       const int8_t *const *acts, const int nt, int32_t nb,
                                       int32_t *out)
{
    /* Each row is the previous row of its stream plus one: prefetch the same line of the next
     * row (measured: +10% single-stream decode, +15% at 8 tokens, where the hardware
     * prefetcher fell behind and code loads stalled). */
    const size_t next_row = (size_t)nb * 32;
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i acc[16];
    for (int k = 0; k < nr * nt; k++)
        acc[k] = _mm512_setzero_si512();
    int32_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        for (int i = 0; i < nr; i++) {
            prefetch_at(rows[i], 32 * (size_t)b + next_row);
            const __m512i c = _mm512_loadu_si512((const void *)(rows[i] + 32 * b));
            const __m512i p0 = _mm512_and_si512(_mm512_srli_epi16(c, 6), m3);
            const __m512i p1 = _mm512_and_si512(_mm512_srli_epi16(c, 4), m3);
            const __m512i p2 = _mm512_and_si512(_mm512_srli_epi16(c, 2), m3);
            const __m512i p3 = _mm512_and_si512(c, m3);
            for (int j = 0; j < nt; j++) {
                const int8_t *a = acts[j] + 128 * b;
                __m512i v = acc[i * nt + j];
                v = _mm512_dpbusd_epi32(v, p0, _mm512_loadu_si512((const void *)a));
                v = _mm512_dpbusd_epi32(v, p1, _mm512_loadu_si512((const void *)(a + 64)));
                v = _mm512_dpbusd_epi32(v, p2, _mm512_loadu_si512((const void *)(a + 128)));
                v = _mm512_dpbusd_epi32(v, p3, _mm512_loadu_si512((const void *)(a + 192)));
                acc[i * nt + j] = v;
            }
        }
    }
    int32_t tail[16] = {0};
    if (b < nb) {  /* odd last block, natural layout */
        const __m256i m3y = _mm256_set1_epi8(3);
        for (int i = 0; i < nr; i++) {
            const __m256i c = _mm256_loadu_si256((const __m256i *)(rows[i] + 32 * b));
            const __m256i p0 = _mm256_and_si256(_mm256_srli_epi16(c, 6), m3y);
            const __m256i p1 = _mm256_and_si256(_mm256_srli_epi16(c, 4), m3y);
            const __m256i p2 = _mm256_and_si256(_mm256_srli_epi16(c, 2), m3y);
            const __m256i p3 = _mm256_and_si256(c, m3y);
            for (int j = 0; j < nt; j++) {
                const int8_t *a = acts[j] + 128 * b;
                __m256i v = _mm256_setzero_si256();
                v = _mm256_dpbusd_epi32(v, p0, _mm256_loadu_si256((const __m256i *)a));
                v = _mm256_dpbusd_epi32(v, p1, _mm256_loadu_si256((const __m256i *)(a + 32)));
                v = _mm256_dpbusd_epi32(v, p2, _mm256_loadu_si256((const __m256i *)(a + 64)));
                v = _mm256_dpbusd_epi32(v, p3, _mm256_loadu_si256((const __m256i *)(a + 96)));
                tail[i * nt + j] = hsum_epi32(v);
            }
        }
    }
    for (int k = 0; k < nr * nt; k++)
        out[k] = _mm512_reduce_add_epi32(acc[k]) + tail[k];
}

#define TERNARY_TILE512(NR, NT)                                                               \
    AVX512_FN static void ternary512_tile_##NR##x##NT(const uint8_t *const *rows,              \
                                                      const int8_t *const *acts, int32_t nb, \
                                                      int32_t *out)                          \
    {                                                                                        \
        ternary_tile_avx512(rows, NR, acts, NT, nb, out);                                    \
    }
TERNARY_TILE512(4, 2)
TERNARY_TILE512(4, 3)
TERNARY_TILE512(4, 4)
TERNARY_TILE512(1, 1)
TERNARY_TILE512(1, 2)
TERNARY_TILE512(1, 3)
TERNARY_TILE512(1, 4)
TERNARY_TILE512(2, 8)

/* Single token, 4 rows: the planes are masked in place instead of shifted down (code << 6,
 * << 4, << 2 and << 0 as unsigned bytes, at most 192), each plane into its own accumulator,
 * and the exact multiples of 64, 16 and 4 divided out at the end. This keeps port 0 (which
 * runs both 512-bit shifts and vpdpbusd) to the four multiplications per 64 code bytes. */
AVX512_FN static void ternary512_tile_4x1_masked(const uint8_t *const *rows,
                                                 const int8_t *const *acts, int32_t nb,
                                                 int32_t *out)
{
    const size_t next_row = (size_t)nb * 32;
    const __m512i mk0 = _mm512_set1_epi8((char)0xC0), mk1 = _mm512_set1_epi8(0x30),
                  mk2 = _mm512_set1_epi8(0x0C), mk3 = _mm512_set1_epi8(0x03);
    __m512i acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 4; k++)
            acc[i][k] = _mm512_setzero_si512();
    int32_t b = 0;
    for (; b + 2 <= nb; b += 2) {
        const int8_t *a = acts[0] + 128 * b;
        const __m512i a0 = _mm512_loadu_si512((const void *)a);
        const __m512i a1 = _mm512_loadu_si512((const void *)(a + 64));
        const __m512i a2 = _mm512_loadu_si512((const void *)(a + 128));
        const __m512i a3 = _mm512_loadu_si512((const void *)(a + 192));
        for (int i = 0; i < 4; i++) {
            prefetch_at(rows[i], 32 * (size_t)b + next_row);
            const __m512i c = _mm512_loadu_si512((const void *)(rows[i] + 32 * b));
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], _mm512_and_si512(c, mk0), a0);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], _mm512_and_si512(c, mk1), a1);
            acc[i][2] = _mm512_dpbusd_epi32(acc[i][2], _mm512_and_si512(c, mk2), a2);
            acc[i][3] = _mm512_dpbusd_epi32(acc[i][3], _mm512_and_si512(c, mk3), a3);
        }
    }
    int32_t tail[4] = {0};
    if (b < nb) {  /* odd last block, natural layout */
        const int8_t *a1[1] = {acts[0]};
        for (int i = 0; i < 4; i++) {
            const uint8_t *r1[1] = {rows[i] + 32 * b};
            const int8_t *ab[1] = {a1[0] + 128 * b};
            ternary_tile_1x1(r1, ab, 1, &tail[i]);
        }
    }
    /* every lane of plane l's accumulator is an exact multiple of 4^(3-l): shift per lane,
     * then one reduction per row */
    for (int i = 0; i < 4; i++) {
        const __m512i v = _mm512_add_epi32(
            _mm512_add_epi32(_mm512_srai_epi32(acc[i][0], 6), _mm512_srai_epi32(acc[i][1], 4)),
            _mm512_add_epi32(_mm512_srai_epi32(acc[i][2], 2), acc[i][3]));
        out[i] = _mm512_reduce_add_epi32(v) + tail[i];
    }
}

static const ternary_tile_fn ternary512_tiles[2][4] = {
    {ternary512_tile_1x1, ternary512_tile_1x2, ternary512_tile_1x3, ternary512_tile_1x4},
    {ternary512_tile_4x1_masked, ternary512_tile_4x2, ternary512_tile_4x3, ternary512_tile_4x4},
};

/* Tokens [t0, t1) of rows [r0, r1). */
AVX512_FN static void ternary512_span(const bn_ternary *w, int32_t r0, int32_t r1,
                                      const bn_qact *a, int32_t t0, int32_t t1, float *y,
                                      int64_t y_stride)
{
    const size_t row_bytes = (size_t)w->n_in / 4;
    const int32_t nb = w->n_in / 128;
    const int32_t len = (r1 - r0) / STREAMS;
    int32_t out[16];
    const uint8_t *rows[4];
    const int8_t *acts[8];
    int32_t rr[4];
    /* 4 rows from 4 streams, up to 4 tokens per tile: 16 accumulators; groups of 8 tokens
     * take 2 rows at a time (16 accumulators too, half the plane decoding per product) */
    const int32_t t8 = t0 + (t1 - t0) / 8 * 8;
    for (int32_t i = 0; i < len; i++) {
        for (int k = 0; k < 4; k++) {
            rr[k] = r0 + k * len + i;
            rows[k] = w->codes + (size_t)rr[k] * row_bytes;
        }
        for (int32_t t = t0; t < t8; t += 8) {
            for (int j = 0; j < 8; j++)
                acts[j] = a->q + (size_t)(t + j) * a->stride;
            for (int half = 0; half < 2; half++) {
                ternary512_tile_2x8(rows + 2 * half, acts, nb, out);
                for (int k = 0; k < 2; k++)
                    for (int j = 0; j < 8; j++)
                        y[(t + j) * y_stride + rr[2 * half + k]] = bitlinear_out(
                            out[k * 8 + j], a->qsum[t + j], a->s[t + j], w->scale);
            }
        }
        for (int32_t t = t8; t < t1; t += 4) {
            const int nt = t1 - t < 4 ? t1 - t : 4;
            for (int j = 0; j < nt; j++)
                acts[j] = a->q + (size_t)(t + j) * a->stride;
            ternary512_tiles[1][nt - 1](rows, acts, nb, out);
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < nt; j++)
                    y[(t + j) * y_stride + rr[k]] = bitlinear_out(
                        out[k * nt + j], a->qsum[t + j], a->s[t + j], w->scale);
        }
    }
    for (int32_t r = r0 + STREAMS * len; r < r1; r++) {
        rows[0] = w->codes + (size_t)r * row_bytes;
        for (int32_t t = t0; t < t1; t += 4) {
            const int nt = t1 - t < 4 ? t1 - t : 4;
            for (int j = 0; j < nt; j++)
                acts[j] = a->q + (size_t)(t + j) * a->stride;
            ternary512_tiles[0][nt - 1](rows, acts, nb, out);
            for (int j = 0; j < nt; j++)
                y[(t + j) * y_stride + r] =
                    bitlinear_out(out[j], a->qsum[t + j], a->s[t + j], w->scale);
        }
    }
}

AVX512_FN static void ternary_avx512(const bn_ternary *w, int32_t r0, int32_t r1,
                                     const bn_qact *a, float *y, int64_t y_stride)
{
    /* Many tokens (prefill): groups of 8 outermost, so a group's activations stay in L1
     * while the rows stream past; the rows come again from L2 for the next group. */
    for (int32_t t = 0; t < a->n_tok; t += 8)
        ternary512_span(w, r0, r1, a, t, t + 8 < a->n_tok ? t + 8 : a->n_tok, y, y_stride);
}

/* F16 head with 16-lane accumulators: lane l of a zmm is partial sum l of kernels.h. */
AVX512_INLINE void f16_tile_avx512(const uint16_t *const *rows, const int nr,
                                   const float *const *xs, const int nt, int32_t n_in,
                                   float *out)
{
    __m512 acc[16];
    for (int k = 0; k < nr * nt; k++)
        acc[k] = _mm512_setzero_ps();
    for (int32_t e = 0; e < n_in; e += 16) {
        __m512 wv[4];
        for (int i = 0; i < nr; i++) {
            if ((e & 31) == 0)  /* the next row of the stream, line by line */
                prefetch_at(rows[i], 2 * ((size_t)e + (size_t)n_in));
            wv[i] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(rows[i] + e)));
        }
        for (int j = 0; j < nt; j++) {
            const __m512 xv = _mm512_loadu_ps(xs[j] + e);
            for (int i = 0; i < nr; i++)
                acc[i * nt + j] = _mm512_fmadd_ps(wv[i], xv, acc[i * nt + j]);
        }
    }
    for (int k = 0; k < nr * nt; k++)
        out[k] = reduce16_avx2(
            _mm512_castps512_ps256(acc[k]),
            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[k]), 1)));
}

#define F16_TILE512(NR, NT)                                                                   \
    AVX512_FN static void f16_512_tile_##NR##x##NT(const uint16_t *const *rows,                \
                                                   const float *const *xs, int32_t n_in,     \
                                                   float *out)                               \
    {                                                                                        \
        f16_tile_avx512(rows, NR, xs, NT, n_in, out);                                        \
    }
F16_TILE512(4, 1)
F16_TILE512(4, 2)
F16_TILE512(4, 3)
F16_TILE512(4, 4)
F16_TILE512(1, 1)
F16_TILE512(1, 2)
F16_TILE512(1, 3)
F16_TILE512(1, 4)

typedef void (*f16_tile_fn)(const uint16_t *const *, const float *const *, int32_t, float *);
static const f16_tile_fn f16_512_tiles[2][4] = {
    {f16_512_tile_1x1, f16_512_tile_1x2, f16_512_tile_1x3, f16_512_tile_1x4},
    {f16_512_tile_4x1, f16_512_tile_4x2, f16_512_tile_4x3, f16_512_tile_4x4},
};

AVX512_FN static void f16_matmul_avx512(const uint16_t *w, int32_t n_in, int32_t r0, int32_t r1,
                                        const float *x, int32_t n_tok, int64_t x_stride,
                                        float *y, int64_t y_stride)
{
    const int32_t len = (r1 - r0) / STREAMS;
    const uint16_t *rows[4];
    const float *xs[4];
    float out[16];
    int32_t rr[4];
    /* (2 rows x 8 tokens tiles are slower here: 8 tokens of F32 input overflow L1) */
    for (int32_t i = 0; i < len; i++) {
        for (int k = 0; k < 4; k++) {
            rr[k] = r0 + k * len + i;
            rows[k] = w + (size_t)rr[k] * n_in;
        }
        for (int32_t t = 0; t < n_tok; t += 4) {
            const int nt = n_tok - t < 4 ? n_tok - t : 4;
            for (int j = 0; j < nt; j++)
                xs[j] = x + (t + j) * x_stride;
            f16_512_tiles[1][nt - 1](rows, xs, n_in, out);
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < nt; j++)
                    y[(t + j) * y_stride + rr[k]] = out[k * nt + j];
        }
    }
    for (int32_t r = r0 + STREAMS * len; r < r1; r++) {
        rows[0] = w + (size_t)r * n_in;
        for (int32_t t = 0; t < n_tok; t += 4) {
            const int nt = n_tok - t < 4 ? n_tok - t : 4;
            for (int j = 0; j < nt; j++)
                xs[j] = x + (t + j) * x_stride;
            f16_512_tiles[0][nt - 1](rows, xs, n_in, out);
            for (int j = 0; j < nt; j++)
                y[(t + j) * y_stride + r] = out[j];
        }
    }
}

static const bn_kernel_set avx512_set = {
    "avx512vnni", quantize_avx512, NULL, ternary_avx512, f16_matmul_avx512,
};

static int cpu_has_avx512vnni(void)
{
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vnni");
}

/* ------------------------------------------------------------------ AMX (tile) int8 */
/* Sapphire Rapids and later: TDPBUSD multiplies a 16x64 tile of unsigned bytes by a 64x16
 * tile of signed bytes into 16x16 int32 sums in one instruction. The 2-bit codes of 64 rows
 * are unpacked into byte tiles (one plane of a block pair per tile row, the same paired layout
 * as the AVX-512 activations), the activations of up to 16 tokens are regrouped once per call
 * into the tile layout (4 consecutive inputs per token per row). Exact int32 sums: the same
 * results as every other kernel. Used for four or more tokens; fewer keep the AVX-512 path
 * (faster there, measured). */
#if defined(__x86_64__) && defined(__linux__) && (__GNUC__ >= 11 || __clang_major__ >= 12)
#include <sys/syscall.h>
#include <unistd.h>
#define BN_HAVE_AMX 1
#define AMX_FN                                                                                \
    __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,"    \
                          "fma,f16c")))
#define AMX_ROWS 64         /* rows per pass: four 16-row accumulator tiles */
#define AMX_MAX_TOK 16

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

/* The kernel asks Linux for the AMX register state once per process. */
static int amx_permitted(void)
{
    /* atomic: contexts on different threads may ask at once (the request is idempotent) */
    static atomic_int state;  /* 0 unknown, 1 yes, -1 no */
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

/* Activations in tile order, once per matrix input: tokens in groups of 16; for group g
 * (n tokens), block pair p and plane k, a 16-row tile whose row r holds 4 consecutive inputs
 * (64k + 4r .. +3 of the pair, paired layout) of each of the n tokens. The odd last block
 * (if any) is not included. */
AMX_FN static void prepare_amx(const int8_t *q, int32_t stride, int32_t n_in, int32_t n_tok,
                               int8_t *tiles)
{
    if (n_tok < 4)
        return;
    const int32_t npairs = n_in / 256;
    for (int32_t g0 = 0; g0 < n_tok; g0 += AMX_MAX_TOK) {
        const int32_t n = n_tok - g0 < AMX_MAX_TOK ? n_tok - g0 : AMX_MAX_TOK;
        int8_t *base = tiles + (size_t)g0 * n_in;
        for (int32_t j = 0; j < n; j++) {
            const int8_t *src = q + (size_t)(g0 + j) * stride;
            /* each 4-byte group of the token lands at (chunk, row r, column j) */
            const __m512i idx = _mm512_add_epi32(
                _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                                                    3, 2, 1, 0),
                                   _mm512_set1_epi32(n)),
                _mm512_set1_epi32(j));
            for (int32_t c = 0; c < npairs * 4; c++) {
                const __m512i v = _mm512_loadu_si512((const void *)(src + 64 * (size_t)c));
                _mm512_i32scatter_epi32((void *)(base + (size_t)c * 64 * n), idx, v, 4);
            }
        }
    }
}

/* Rows [r0, r1) (r1 - r0 a multiple of 64) for tokens [t0, t0 + n) (t0 % 16 == 0, n <= 16).
 * The codes of the next block pair are unpacked while the tiles multiply the current one
 * (two unpack buffers), so tile loads never wait for just-written bytes. */
AMX_FN static void ternary_amx_rows(const bn_ternary *w, int32_t r0, int32_t r1,
                                    const bn_qact *a, int32_t t0, int32_t n, float *y,
                                    int64_t y_stride)
{
    const int32_t nb = w->n_in / 128, npairs = nb / 2;
    const size_t row_bytes = (size_t)w->n_in / 4;
    const size_t b_tile = (size_t)16 * n * 4;
    const int8_t *bt = a->tiles + (size_t)t0 * w->n_in;
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 4; t++) {       /* tmm0-3: 16 rows x n int32 accumulators */
        cfg.rows[t] = 16;
        cfg.colsb[t] = (uint16_t)(n * 4);
    }
    cfg.rows[4] = 16;                   /* tmm4: 16 rows x 64 code bytes */
    cfg.colsb[4] = 64;
    cfg.rows[5] = 16;                   /* tmm5: 16 x (n tokens x 4) activation bytes */
    cfg.colsb[5] = (uint16_t)(n * 4);
    _tile_loadconfig(&cfg);

    const __m512i m3 = _mm512_set1_epi8(3);
    /* [buffer][row tile][plane][row][byte] */
    uint8_t abuf[2][4][4][16][64] __attribute__((aligned(64)));
    int32_t cbuf[4][16][AMX_MAX_TOK] __attribute__((aligned(64)));
    for (int32_t rb = r0; rb < r1; rb += AMX_ROWS) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int32_t p = 0; p <= npairs; p++) {
            if (p < npairs) {   /* unpack pair p */
                uint8_t (*ab)[4][16][64] = abuf[p & 1];
                for (int m = 0; m < AMX_ROWS; m++) {
                    const uint8_t *row =
                        w->codes + (size_t)(rb + m) * row_bytes + 64 * (size_t)p;
                    prefetch_at(row, row_bytes * AMX_ROWS);   /* this row in the next pass */
                    const __m512i c = _mm512_loadu_si512((const void *)row);
                    _mm512_store_si512((void *)ab[m / 16][0][m % 16],
                                       _mm512_and_si512(_mm512_srli_epi16(c, 6), m3));
                    _mm512_store_si512((void *)ab[m / 16][1][m % 16],
                                       _mm512_and_si512(_mm512_srli_epi16(c, 4), m3));
                    _mm512_store_si512((void *)ab[m / 16][2][m % 16],
                                       _mm512_and_si512(_mm512_srli_epi16(c, 2), m3));
                    _mm512_store_si512((void *)ab[m / 16][3][m % 16], _mm512_and_si512(c, m3));
                }
            }
            if (p == 0)
                continue;
            __asm__ volatile("" ::: "memory");   /* the tile loads below read abuf */
            const int32_t q = p - 1;              /* multiply pair q = p - 1 */
            uint8_t (*ab)[4][16][64] = abuf[q & 1];
            for (int k = 0; k < 4; k++) {
                _tile_loadd(5, bt + ((size_t)q * 4 + k) * b_tile, n * 4);
                _tile_loadd(4, ab[0][k], 64);
                _tile_dpbusd(0, 4, 5);
                _tile_loadd(4, ab[1][k], 64);
                _tile_dpbusd(1, 4, 5);
                _tile_loadd(4, ab[2][k], 64);
                _tile_dpbusd(2, 4, 5);
                _tile_loadd(4, ab[3][k], 64);
                _tile_dpbusd(3, 4, 5);
            }
        }
        _tile_stored(0, cbuf[0], AMX_MAX_TOK * 4);
        _tile_stored(1, cbuf[1], AMX_MAX_TOK * 4);
        _tile_stored(2, cbuf[2], AMX_MAX_TOK * 4);
        _tile_stored(3, cbuf[3], AMX_MAX_TOK * 4);
        __asm__ volatile("" ::: "memory");
        /* the epilogue of bitlinear_out, 16 tokens per vector: the same IEEE operations */
        const __mmask16 live = (__mmask16)((1u << n) - 1);
        const __m512i vqsum = _mm512_maskz_loadu_epi32(live, a->qsum + t0);
        const __m512 vs = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), live, a->s + t0);
        const __m512 vscale = _mm512_set1_ps(w->scale);
        for (int m = 0; m < AMX_ROWS; m++) {
            const int32_t r = rb + m;
            if (nb % 2) {   /* odd last block, natural layout */
                const uint8_t *row = w->codes + (size_t)r * row_bytes;
                for (int32_t j = 0; j < n; j++)
                    cbuf[m / 16][m % 16][j] += ternary_dot_scalar(
                        row + 32 * (size_t)(nb - 1), 128,
                        a->q + (size_t)(t0 + j) * a->stride + 128 * (size_t)(nb - 1));
            }
            const __m512i acc = _mm512_load_si512((const void *)cbuf[m / 16][m % 16]);
            const __m512 v = _mm512_mul_ps(
                _mm512_div_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, vqsum)), vs), vscale);
            float outv[16];
            _mm512_storeu_ps(outv, v);
            for (int32_t j = 0; j < n; j++)
                y[(t0 + j) * y_stride + r] = outv[j];
        }
    }
    _tile_release();
}

AMX_FN static void ternary_amx(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                               float *y, int64_t y_stride)
{
    const int32_t n_tok = a->n_tok;
    if (n_tok < 4 || !a->tiles || w->n_in < 256) {   /* 2-3 tokens: AVX-512 is faster */
        ternary_avx512(w, r0, r1, a, y, y_stride);
        return;
    }
    const int32_t r_amx = r0 + (r1 - r0) / AMX_ROWS * AMX_ROWS;
    for (int32_t t = 0; t < n_tok && r_amx > r0; t += AMX_MAX_TOK) {
        const int32_t n = n_tok - t < AMX_MAX_TOK ? n_tok - t : AMX_MAX_TOK;
        ternary_amx_rows(w, r0, r_amx, a, t, n, y, y_stride);
    }
    if (r_amx < r1)
        ternary_avx512(w, r_amx, r1, a, y, y_stride);
}

static const bn_kernel_set amx_set = {
    "amx", quantize_avx512, prepare_amx, ternary_amx, f16_matmul_avx512,
};

static int cpu_has_amx(void)
{
    return cpu_has_avx512vnni() && __builtin_cpu_supports("amx-tile") &&
           __builtin_cpu_supports("amx-int8") && amx_permitted();
}
#endif
#endif /* BN_X86 */

/* ------------------------------------------------------------------ dispatch */

/* Atomic: contexts may run bn_forward on several threads (each calls bn_kernels), and
 * bn_kernel_select may come from yet another; a plain pointer would be a data race. */
static _Atomic(const bn_kernel_set *) selected;

const bn_kernel_set *bn_kernels_by_name(const char *name)
{
    if (!name)
        return NULL;
    if (strcmp(name, "scalar") == 0)
        return &scalar_set;
#ifdef BN_X86
    if (strcmp(name, "avx2") == 0)
        return cpu_has_avx2() ? &avx2_set : NULL;
    if (strcmp(name, "avx512vnni") == 0)
        return cpu_has_avx512vnni() ? &avx512_set : NULL;
#ifdef BN_HAVE_AMX
    if (strcmp(name, "amx") == 0)
        return cpu_has_amx() ? &amx_set : NULL;
#endif
#endif
    return NULL;
}

static const bn_kernel_set *best_kernels(void)
{
#ifdef BN_X86
#ifdef BN_HAVE_AMX
    if (cpu_has_amx())
        return &amx_set;
#endif
    if (cpu_has_avx512vnni())
        return &avx512_set;
    if (cpu_has_avx2())
        return &avx2_set;
#endif
    return &scalar_set;
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
    if (bn_kernels() != &scalar_set) {
        f16_row_avx2(src, n, dst);
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
        job->k->ternary(job->w, (int32_t)lo, (int32_t)hi, job->a, job->y, job->w->n_out);
}

int bn_ternary_matmul(const char *kernel, const uint8_t *packed, float scale, int32_t n_in,
                      int32_t n_out, const float *x, int32_t n_tok, float *y, int32_t n_threads)
{
    const bn_kernel_set *k = kernel ? bn_kernels_by_name(kernel) : bn_kernels();
    /* n_in <= 2^22 keeps every int32 accumulator exact for any codes and inputs (3 * 128 *
     * 2^22 < 2^31, also per lane of the masked AVX-512 planes), as bn_context_new's n_ff bound. */
    if (!k || !packed || !x || !y || n_in <= 0 || n_in % 128 != 0 || n_out <= 0 || n_tok <= 0 ||
        n_in > (1 << 22) || n_threads < 1)
        return -1;
    const int32_t stride = n_in;  /* a multiple of 128 */
    int8_t *q = aligned_alloc(64, (size_t)n_tok * (size_t)stride);
    float *s = malloc((size_t)n_tok * sizeof *s);
    int32_t *qsum = malloc((size_t)n_tok * sizeof *qsum);
    int8_t *tiles = aligned_alloc(64, (size_t)n_tok * (size_t)stride);
    bn_pool *pool = bn_pool_new(n_threads);
    int rc = -1;
    if (q && s && qsum && tiles && pool) {
        for (int32_t t = 0; t < n_tok; t++)
            k->quantize(x + (size_t)t * n_in, n_in, q + (size_t)t * stride, &s[t], &qsum[t]);
        if (k->prepare && tiles)
            k->prepare(q, stride, n_in, n_tok, tiles);
        bn_ternary w = {packed, scale, n_in, n_out};
        bn_qact a = {q, stride, n_tok, s, qsum, k->prepare ? tiles : NULL};
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

/* ------------------------------------------------------------------ bandwidth probe */

typedef struct {
    const uint8_t *buf;
    size_t n;
    int32_t streams;
    bn_queue queue;   /* in 1 MiB pieces */
    uint64_t sink[BN_POOL_MAX_THREADS];
} read_job;

typedef long long bn_v4i64 __attribute__((vector_size(32)));

static void read_worker(void *arg, int32_t ith, int32_t nth)
{
    (void)nth;
    read_job *job = arg;
    int64_t lo, hi;
    bn_v4i64 acc[8] = {{0}};  /* one chain per stream (mod 8): loads stay independent */
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
    memset(p->buf, 1, (size_t)n_bytes);  /* fault every page in before timing */
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

double bn_measure_read_bandwidth(uint64_t n_bytes, int32_t n_threads, int32_t streams,
                                 int32_t reps)
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
