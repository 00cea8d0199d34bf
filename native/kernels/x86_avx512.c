/* x86_avx512.c - the kernel set "avx512vnni" (AVX-512 F/BW/VL + VNNI).
 *
 * vpdpbusd adds four u8*s8 products straight into int32 lanes: no 16-bit intermediate at
 * all. A 512-bit register holds the codes of two blocks; the activations are quantized into
 * a matching "paired" layout (for blocks 2p and 2p+1: plane 0 of both, plane 1 of both, ...),
 * so each plane is one 64-byte load. An odd last block keeps the natural layout and runs
 * with 256-bit instructions. The results are the same exact integers as every other kernel. */
#include <string.h>

#include "kernels.h"

#ifdef BN_X86

AVX512_FN void bn_quantize_avx512(const float *x, int32_t n, int8_t *q, float *s_out, int32_t *qsum)
{
    bn_quantize_avx2(x, n, q, s_out, qsum);
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
    if (b < nb) { /* odd last block, natural layout */
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

#define TERNARY_TILE512(NR, NT)                                                                    \
    AVX512_FN static void ternary512_tile_##NR##x##NT(                                             \
        const uint8_t *const *rows, const int8_t *const *acts, int32_t nb, int32_t *out)           \
    {                                                                                              \
        ternary_tile_avx512(rows, NR, acts, NT, nb, out);                                          \
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
    if (b < nb) { /* odd last block, natural layout */
        const int8_t *a1[1] = {acts[0]};
        for (int i = 0; i < 4; i++) {
            const uint8_t *r1[1] = {rows[i] + 32 * b};
            const int8_t *ab[1] = {a1[0] + 128 * b};
            bn_ternary_tile_avx2_1x1(r1, ab, 1, &tail[i]);
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
AVX512_FN static void ternary512_span(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                                      int32_t t0, int32_t t1, float *y, int64_t y_stride)
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
                        y[(t + j) * y_stride + rr[2 * half + k]] =
                            bitlinear_out(out[k * 8 + j], a->qsum[t + j], a->s[t + j], w->scale);
            }
        }
        for (int32_t t = t8; t < t1; t += 4) {
            const int nt = t1 - t < 4 ? t1 - t : 4;
            for (int j = 0; j < nt; j++)
                acts[j] = a->q + (size_t)(t + j) * a->stride;
            ternary512_tiles[1][nt - 1](rows, acts, nb, out);
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < nt; j++)
                    y[(t + j) * y_stride + rr[k]] =
                        bitlinear_out(out[k * nt + j], a->qsum[t + j], a->s[t + j], w->scale);
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

AVX512_FN void bn_ternary_avx512(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                                 float *y, int64_t y_stride)
{
    /* Many tokens (prefill): groups of 8 outermost, so a group's activations stay in L1
     * while the rows stream past; the rows come again from L2 for the next group. */
    for (int32_t t = 0; t < a->n_tok; t += 8)
        ternary512_span(w, r0, r1, a, t, t + 8 < a->n_tok ? t + 8 : a->n_tok, y, y_stride);
}

/* F16 head with 16-lane accumulators: lane l of a zmm is partial sum l of kernels.h. */
AVX512_INLINE void f16_tile_avx512(const uint16_t *const *rows, const int nr,
                                   const float *const *xs, const int nt, int32_t n_in, float *out)
{
    __m512 acc[16];
    for (int k = 0; k < nr * nt; k++)
        acc[k] = _mm512_setzero_ps();
    for (int32_t e = 0; e < n_in; e += 16) {
        __m512 wv[4];
        for (int i = 0; i < nr; i++) {
            if ((e & 31) == 0) /* the next row of the stream, line by line */
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
        out[k] =
            reduce16_avx2(_mm512_castps512_ps256(acc[k]),
                          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[k]), 1)));
}

/* The tiles of the head's driver (head_rows_avx512) see rows as bytes; the F16 ones turn them
 * back into F16 rows (the loader checked their 2-byte alignment). */
#define F16_TILE512(NR, NT)                                                                        \
    AVX512_FN static void f16_512_tile_##NR##x##NT(                                                \
        const uint8_t *const *bytes, const float *const *xs, int32_t n_in, float *out)             \
    {                                                                                              \
        const uint16_t *rows[NR];                                                                  \
        for (int i = 0; i < NR; i++)                                                               \
            rows[i] = (const uint16_t *)(const void *)bytes[i];                                    \
        f16_tile_avx512(rows, NR, xs, NT, n_in, out);                                              \
    }
F16_TILE512(4, 1)
F16_TILE512(4, 2)
F16_TILE512(4, 3)
F16_TILE512(4, 4)
F16_TILE512(1, 1)
F16_TILE512(1, 2)
F16_TILE512(1, 3)
F16_TILE512(1, 4)

/* tiles[rows == 4][tokens - 1] */
typedef void (*head_tile_fn)(const uint8_t *const *, const float *const *, int32_t, float *);
static const head_tile_fn f16_512_tiles[2][4] = {
    {f16_512_tile_1x1, f16_512_tile_1x2, f16_512_tile_1x3, f16_512_tile_1x4},
    {f16_512_tile_4x1, f16_512_tile_4x2, f16_512_tile_4x3, f16_512_tile_4x4},
};

/* The head (F16 or Q8_0 rows of row_bytes each): rows r0..r1 in STREAMS streams, tiles of 4
 * rows (1 for the leftover rows) by up to 4 tokens. */
AVX512_INLINE void head_rows_avx512(const uint8_t *w, size_t row_bytes, int32_t n_in, int32_t r0,
                                    int32_t r1, const float *x, int32_t n_tok, int64_t x_stride,
                                    float *y, int64_t y_stride, const head_tile_fn tiles[2][4])
{
    const int32_t len = (r1 - r0) / STREAMS;
    const uint8_t *rows[4];
    const float *xs[4];
    float out[16];
    int32_t rr[4];
    /* (2 rows x 8 tokens tiles are slower here: 8 tokens of F32 input overflow L1) */
    for (int32_t i = 0; i < len; i++) {
        for (int k = 0; k < 4; k++) {
            rr[k] = r0 + k * len + i;
            rows[k] = w + (size_t)rr[k] * row_bytes;
        }
        for (int32_t t = 0; t < n_tok; t += 4) {
            const int nt = n_tok - t < 4 ? n_tok - t : 4;
            for (int j = 0; j < nt; j++)
                xs[j] = x + (t + j) * x_stride;
            tiles[1][nt - 1](rows, xs, n_in, out);
            for (int k = 0; k < 4; k++)
                for (int j = 0; j < nt; j++)
                    y[(t + j) * y_stride + rr[k]] = out[k * nt + j];
        }
    }
    for (int32_t r = r0 + STREAMS * len; r < r1; r++) {
        rows[0] = w + (size_t)r * row_bytes;
        for (int32_t t = 0; t < n_tok; t += 4) {
            const int nt = n_tok - t < 4 ? n_tok - t : 4;
            for (int j = 0; j < nt; j++)
                xs[j] = x + (t + j) * x_stride;
            tiles[0][nt - 1](rows, xs, n_in, out);
            for (int j = 0; j < nt; j++)
                y[(t + j) * y_stride + r] = out[j];
        }
    }
}

AVX512_FN void bn_f16_matmul_avx512(const uint16_t *w, int32_t n_in, int32_t r0, int32_t r1,
                                    const float *x, int32_t n_tok, int64_t x_stride, float *y,
                                    int64_t y_stride)
{
    head_rows_avx512((const uint8_t *)(const void *)w, 2 * (size_t)n_in, n_in, r0, r1, x, n_tok,
                     x_stride, y, y_stride, f16_512_tiles);
}

/* The Q8_0 head (model-format §5.3): a block's 32 weights are elements e..e+31 of the
 * canonical order, two zmm of 16 lanes fed into the one accumulator in element order, each
 * weight q * d exact in f32. */
AVX512_INLINE __m512 q8_0_weights16(const uint8_t *q, __m512 d)
{
    const __m128i b = _mm_loadu_si128((const __m128i *)(const void *)q);
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
}

AVX512_INLINE void q8_0_tile_avx512(const uint8_t *const *rows, const int nr,
                                    const float *const *xs, const int nt, int32_t n_in, float *out)
{
    const size_t row_bytes = (size_t)(n_in / 32) * BN_Q8_0_BLOCK;
    __m512 acc[16];
    for (int k = 0; k < nr * nt; k++)
        acc[k] = _mm512_setzero_ps();
    for (int32_t e = 0; e < n_in; e += 32) {
        const size_t off = (size_t)(e / 32) * BN_Q8_0_BLOCK;
        __m512 w0[4], w1[4];
        for (int i = 0; i < nr; i++) {
            prefetch_at(rows[i], off + row_bytes); /* the next row of the stream */
            const uint8_t *blk = rows[i] + off;
            uint16_t h;
            memcpy(&h, blk, sizeof h);
            const __m512 d = _mm512_set1_ps(_cvtsh_ss(h));
            w0[i] = q8_0_weights16(blk + 2, d);
            w1[i] = q8_0_weights16(blk + 18, d);
        }
        for (int j = 0; j < nt; j++) {
            const __m512 x0 = _mm512_loadu_ps(xs[j] + e), x1 = _mm512_loadu_ps(xs[j] + e + 16);
            for (int i = 0; i < nr; i++) {
                const int k = i * nt + j;
                acc[k] = _mm512_fmadd_ps(w0[i], x0, acc[k]);
                acc[k] = _mm512_fmadd_ps(w1[i], x1, acc[k]);
            }
        }
    }
    for (int k = 0; k < nr * nt; k++)
        out[k] =
            reduce16_avx2(_mm512_castps512_ps256(acc[k]),
                          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[k]), 1)));
}

#define Q8_0_TILE512(NR, NT)                                                                       \
    AVX512_FN static void q8_0_512_tile_##NR##x##NT(                                               \
        const uint8_t *const *rows, const float *const *xs, int32_t n_in, float *out)              \
    {                                                                                              \
        q8_0_tile_avx512(rows, NR, xs, NT, n_in, out);                                             \
    }
Q8_0_TILE512(4, 1)
Q8_0_TILE512(4, 2)
Q8_0_TILE512(4, 3)
Q8_0_TILE512(4, 4)
Q8_0_TILE512(1, 1)
Q8_0_TILE512(1, 2)
Q8_0_TILE512(1, 3)
Q8_0_TILE512(1, 4)

static const head_tile_fn q8_0_512_tiles[2][4] = {
    {q8_0_512_tile_1x1, q8_0_512_tile_1x2, q8_0_512_tile_1x3, q8_0_512_tile_1x4},
    {q8_0_512_tile_4x1, q8_0_512_tile_4x2, q8_0_512_tile_4x3, q8_0_512_tile_4x4},
};

AVX512_FN void bn_q8_0_matmul_avx512(const uint8_t *w, int32_t n_in, int32_t r0, int32_t r1,
                                     const float *x, int32_t n_tok, int64_t x_stride, float *y,
                                     int64_t y_stride)
{
    head_rows_avx512(w, (size_t)(n_in / 32) * BN_Q8_0_BLOCK, n_in, r0, r1, x, n_tok, x_stride, y,
                     y_stride, q8_0_512_tiles);
}

/* ------------------------------------------------------------------ Q2_0 (model-format §10.6)
 *
 * One register lane per block: a chunk of 16 blocks gives 16 block sums in one vector, which
 * are the 16 float lanes of model-format §10.6.2 with no horizontal step. Byte p of a block's
 * codes holds its weights 4p..4p+3 (at bits 0, 2, 4, 6), so dword m (code bytes 4m..4m+3) is
 * weights 16m..16m+15; the codes of 16 blocks are transposed so that W[m] lane i is dword m of
 * block i. Plane k of W[m] (bits 2k of each byte, masked in place: the code times 4^k) then
 * multiplies, in vpdpbusd, the activations of weights 16m + 4b + k (b = byte in lane) of every
 * block: q2_0_quantize stores each chunk's 1024 activations as 16 vectors in that order,
 * vector 4m + k, lane i, byte b = activation 64i + 16m + 4b + k of the chunk. The last partial
 * chunk (fewer than 16 blocks) keeps the natural layout. */

#define Q2_0_CHUNK 1024                       /* activations per chunk of 16 blocks */
#define Q2_0_CHUNK_BYTES (16 * BN_Q2_0_BLOCK) /* its codes and scales */

AVX512_FN void bn_q2_0_quantize_avx512(const float *x, int32_t n, int8_t *q, float *s_out,
                                       int32_t *qsum)
{
    bn_quantize_avx2(x, n, q, s_out, qsum);
    if (n > Q2_0_MAX_TILED)
        return;
    /* within each 16 bytes (one m of a block): byte 4b + k goes to 4k + b */
    const __m512i tr4 =
        _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    for (int32_t c = 0; c + Q2_0_CHUNK <= n; c += Q2_0_CHUNK) {
        int8_t *chunk = q + c;
        int32_t blk[16][16]; /* [block][dword 4m + k] */
        for (int i = 0; i < 16; i++)
            _mm512_storeu_si512(
                (void *)blk[i],
                _mm512_shuffle_epi8(_mm512_loadu_si512((const void *)(chunk + 64 * i)), tr4));
        int32_t out[16][16]; /* [vector 4m + k][block] */
        for (int j = 0; j < 16; j++)
            for (int i = 0; i < 16; i++)
                out[j][i] = blk[i][j];
        memcpy(chunk, out, sizeof out);
    }
}

/* The codes of the 16 blocks at blk, transposed (W[m] lane i = code bytes 4m..4m+3 of block
 * i), and their scales as floats. Reads bytes 0..287 of blk only. */
AVX512_INLINE void q2_0_chunk(const uint8_t *blk, __m512i W[4], __m512 *d)
{
    /* z[r], 128-bit lane j: the 16 code bytes of block 4j + r */
    __m512i z[4];
    for (int r = 0; r < 4; r++) {
        const uint8_t *b = blk + (size_t)r * BN_Q2_0_BLOCK + 2;
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)b));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 4 * BN_Q2_0_BLOCK)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 8 * BN_Q2_0_BLOCK)), 2);
        z[r] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(b + 12 * BN_Q2_0_BLOCK)), 3);
    }
    /* a 4 x 4 dword transpose in every 128-bit lane */
    const __m512i lo01 = _mm512_unpacklo_epi32(z[0], z[1]),
                  hi01 = _mm512_unpackhi_epi32(z[0], z[1]);
    const __m512i lo23 = _mm512_unpacklo_epi32(z[2], z[3]),
                  hi23 = _mm512_unpackhi_epi32(z[2], z[3]);
    W[0] = _mm512_unpacklo_epi64(lo01, lo23);
    W[1] = _mm512_unpackhi_epi64(lo01, lo23);
    W[2] = _mm512_unpacklo_epi64(hi01, hi23);
    W[3] = _mm512_unpackhi_epi64(hi01, hi23);
    /* scale i at byte 18i, word 9i: blocks 0-7 in bytes 0..127, blocks 8-15 in 144..271 */
    const __m512i idx =
        _mm512_setr_epi32(0x00090000, 0x001b0012, 0x002d0024, 0x003f0036, 0x00090000, 0x001b0012,
                          0x002d0024, 0x003f0036, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i a = _mm512_permutex2var_epi16(_mm512_loadu_si512((const void *)blk), idx,
                                                _mm512_loadu_si512((const void *)(blk + 64)));
    const __m512i b = _mm512_permutex2var_epi16(_mm512_loadu_si512((const void *)(blk + 144)), idx,
                                                _mm512_loadu_si512((const void *)(blk + 208)));
    *d = _mm512_cvtph_ps(
        _mm256_mask_mov_epi16(_mm512_castsi512_si256(a), 0xFF00, _mm512_castsi512_si256(b)));
}

/* Per block, sum(q) over the chunk's 64 activations of each block (lanes as the codes). */
AVX512_INLINE __m512i q2_0_chunk_qsums(const int8_t *act)
{
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i s = _mm512_setzero_si512();
    for (int j = 0; j < 16; j++)
        s = _mm512_dpbusd_epi32(s, ones, _mm512_loadu_si512((const void *)(act + 64 * j)));
    return s;
}

/* NR rows (from distant parts of the range) and NT tokens over nch full chunks: p[i * NT + t]
 * += the chunks' lanes of §10.6.2 for row i and token t. */
AVX512_INLINE void q2_0_tile(const uint8_t *const *rows, const int nr, int32_t nch,
                             const int8_t *const *acts, const __m512i *const *qsums, const int nt,
                             size_t next_row, __m512 *p)
{
    const __m512i mk[4] = {_mm512_set1_epi8(0x03), _mm512_set1_epi8(0x0C), _mm512_set1_epi8(0x30),
                           _mm512_set1_epi8((char)0xC0)};
    for (int32_t c = 0; c < nch; c++) {
        for (int i = 0; i < nr; i++) {
            const uint8_t *blk = rows[i] + (size_t)c * Q2_0_CHUNK_BYTES;
            /* the same chunk of the stream's next row, its 4.5 lines, into L2 only
             * (measured: a quarter less time per decoded token than into L1, where the
             * prefetches competed with the loads in use) */
            for (size_t l = 0; l < Q2_0_CHUNK_BYTES; l += 64)
                _mm_prefetch((const char *)((uintptr_t)blk + next_row + l), _MM_HINT_T1);
            __m512i W[4];
            __m512 d;
            q2_0_chunk(blk, W, &d);
            __m512i tot[4];
            for (int t = 0; t < nt; t++)
                tot[t] = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++) {
                __m512i acc[4];
                for (int t = 0; t < nt; t++)
                    acc[t] = _mm512_setzero_si512();
                for (int m = 0; m < 4; m++) {
                    const __m512i plane = _mm512_and_si512(W[m], mk[k]);
                    for (int t = 0; t < nt; t++)
                        acc[t] = _mm512_dpbusd_epi32(
                            acc[t], plane,
                            _mm512_loadu_si512((const void *)(acts[t] + (size_t)c * Q2_0_CHUNK +
                                                              64 * (4 * m + k))));
                }
                /* every product of plane k is a multiple of 4^k: the shift is exact */
                for (int t = 0; t < nt; t++)
                    tot[t] = _mm512_add_epi32(tot[t], _mm512_srai_epi32(acc[t], 2 * k));
            }
            for (int t = 0; t < nt; t++) {
                const __m512i isum = _mm512_sub_epi32(tot[t], qsums[t][c]);
                p[i * nt + t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, p[i * nt + t]);
            }
        }
    }
}

#define Q2_0_TILE512(NR, NT)                                                                       \
    AVX512_FN static void q2_0_tile_##NR##x##NT(                                                   \
        const uint8_t *const *rows, int32_t nch, const int8_t *const *acts,                        \
        const __m512i *const *qsums, size_t next_row, __m512 *p)                                   \
    {                                                                                              \
        q2_0_tile(rows, NR, nch, acts, qsums, NT, next_row, p);                                    \
    }
Q2_0_TILE512(1, 1)
Q2_0_TILE512(1, 2)
Q2_0_TILE512(1, 3)
Q2_0_TILE512(1, 4)
Q2_0_TILE512(4, 1)
Q2_0_TILE512(4, 2)
Q2_0_TILE512(4, 3)
Q2_0_TILE512(4, 4)

typedef void (*q2_0_tile_fn)(const uint8_t *const *, int32_t, const int8_t *const *,
                             const __m512i *const *, size_t, __m512 *);
static const q2_0_tile_fn q2_0_tiles[2][4] = {
    {q2_0_tile_1x1, q2_0_tile_1x2, q2_0_tile_1x3, q2_0_tile_1x4},
    {q2_0_tile_4x1, q2_0_tile_4x2, q2_0_tile_4x3, q2_0_tile_4x4},
};

/* The blocks of the last partial chunk (natural layout) into lanes 0..rem-1 of p[t], then
 * y = (the tree of the lanes) / s, for one row and nt tokens. */
AVX512_FN static void q2_0_finish(const uint8_t *row, int32_t nch, int32_t rem,
                                  const int8_t *const *acts, const float *s, int nt, __m512 *p,
                                  float *y, int64_t y_stride)
{
    if (rem) {
        const uint8_t *blk = row + (size_t)nch * Q2_0_CHUNK_BYTES;
        float d[16] = {0};
        for (int32_t g = 0; g < rem; g++) {
            uint16_t h;
            memcpy(&h, blk + (size_t)g * BN_Q2_0_BLOCK, sizeof h);
            d[g] = bn_f16_to_f32(h);
        }
        const __m512 dv = _mm512_loadu_ps(d);
        for (int t = 0; t < nt; t++) {
            int32_t isum[16] = {0};
            bn_q2_0_isums_avx2(blk, acts[t] + (size_t)nch * Q2_0_CHUNK, rem, isum);
            p[t] = _mm512_mask3_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512((const void *)isum)),
                                         dv, p[t], (__mmask16)((1u << rem) - 1));
        }
    }
    for (int t = 0; t < nt; t++)
        y[t * y_stride] =
            reduce16_avx2(_mm512_castps512_ps256(p[t]),
                          _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(p[t]), 1))) /
            s[t];
}

/* What the units of q2_0_schedule share. */
typedef struct {
    q2_0_call c;
    __m512i qsum[Q2_0_QSUM_BYTES / 64]; /* per token of the group and chunk */
} q2_0_run;

AVX512_FN static void q2_0_sums(void *arg, int32_t g0, int32_t gn)
{
    q2_0_run *run = arg;
    const bn_qact *a = run->c.a;
    for (int32_t t = 0; t < gn; t++)
        for (int32_t c = 0; c < run->c.nch; c++)
            run->qsum[t * run->c.nch + c] =
                q2_0_chunk_qsums(a->q + (size_t)(g0 + t) * a->stride + (size_t)c * Q2_0_CHUNK);
}

AVX512_FN static void q2_0_unit_avx512(void *arg, const q2_0_unit *u)
{
    q2_0_run *run = arg;
    const size_t row_bytes = (size_t)(run->c.w->n_in / 64) * BN_Q2_0_BLOCK;
    const __m512i *qs[4];
    for (int j = 0; j < u->nt; j++)
        qs[j] = run->qsum + (size_t)(u->tg + j) * run->c.nch;
    __m512 p[STREAMS * 4];
    for (int k = 0; k < u->nr * u->nt; k++)
        p[k] = _mm512_setzero_ps();
    if (run->c.nch)
        q2_0_tiles[u->nr > 1][u->nt - 1](u->rows, run->c.nch, u->acts, qs, row_bytes, p);
    for (int k = 0; k < u->nr; k++)
        q2_0_finish(u->rows[k], run->c.nch, run->c.rem, u->acts, run->c.a->s + u->t0, u->nt,
                    p + k * u->nt, run->c.y + u->t0 * run->c.y_stride + u->rr[k], run->c.y_stride);
}

AVX512_FN void bn_q2_0_avx512(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                              float *y, int64_t y_stride)
{
    if (w->n_in > Q2_0_MAX_TILED) { /* natural layout (bn_q2_0_quantize_avx512) */
        bn_q2_0_avx2(w, r0, r1, a, y, y_stride);
        return;
    }
    q2_0_run run; /* not initialized as a whole: that would clear the 32 KiB of sums */
    run.c = q2_0_call_of(w, a, y, y_stride);
    q2_0_schedule(w, r0, r1, a, q2_0_sums, q2_0_unit_avx512, &run);
}

const bn_kernel_set bn_kernels_avx512 = {
    .name = "avx512vnni",
    .quantize = bn_quantize_avx512,
    .prepare = NULL,
    .ternary = bn_ternary_avx512,
    .q2_0 = bn_q2_0_avx512,
    .q2_0_quantize = bn_q2_0_quantize_avx512,
    .f16_matmul = bn_f16_matmul_avx512,
    .q8_0_matmul = bn_q8_0_matmul_avx512,
};

#endif /* BN_X86 */
