/* x86_avx2.c - the kernel set "avx2" (AVX2 + FMA + F16C): BitLinear with maddubs into int16
 * partial sums widened to int32 often enough never to overflow, the F16 head with 8-lane FMA
 * accumulators, the vector F16 row conversion, and Q2_0 with one block per 32-bit lane (the
 * AVX-512 sets' activation layout, read in 256-bit halves).
 */
#include <string.h>

#include "kernels.h"

#ifdef BN_X86

AVX2_FN void bn_quantize_avx2(const float *x, int32_t n, int8_t *q, float *s_out, int32_t *qsum)
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
                if ((b & 1) == 0) /* the same line of the stream's next row (see avx512) */
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
#define TERNARY_TILE(NR, NT)                                                                       \
    AVX2_FN static void ternary_tile_##NR##x##NT(                                                  \
        const uint8_t *const *rows, const int8_t *const *acts, int32_t nb, int32_t *out)           \
    {                                                                                              \
        ternary_tile_avx2(rows, NR, acts, NT, nb, out);                                            \
    }
TERNARY_TILE(4, 1)

/* The 1 x 1 tile, also used by the AVX-512 kernels for an odd last block. */
AVX2_FN void bn_ternary_tile_avx2_1x1(const uint8_t *const *rows, const int8_t *const *acts,
                                      int32_t nb, int32_t *out)
{
    ternary_tile_avx2(rows, 1, acts, 1, nb, out);
}

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
            bn_ternary_tile_avx2_1x1(rows, acts, nb, out);
            y[t * y_stride + r] = bitlinear_out(out[0], a->qsum[t], a->s[t], w->scale);
        }
    }
}

AVX2_INLINE void f16_tile_avx2(const uint16_t *const *rows, const int nr, const float *const *xs,
                               const int nt, int32_t n_in, float *out)
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

/* The tiles of the head's driver (head_rows_avx2) see rows as bytes; the F16 ones turn them
 * back into F16 rows (the loader checked their 2-byte alignment). */
#define F16_TILE(NR, NT)                                                                           \
    AVX2_FN static void f16_tile_##NR##x##NT(const uint8_t *const *bytes, const float *const *xs,  \
                                             int32_t n_in, float *out)                             \
    {                                                                                              \
        const uint16_t *rows[NR];                                                                  \
        for (int i = 0; i < NR; i++)                                                               \
            rows[i] = (const uint16_t *)(const void *)bytes[i];                                    \
        f16_tile_avx2(rows, NR, xs, NT, n_in, out);                                                \
    }
F16_TILE(4, 1)
F16_TILE(1, 1)

typedef void (*head_tile_fn)(const uint8_t *const *, const float *const *, int32_t, float *);

/* The head (F16 or Q8_0 rows of row_bytes each): rows r0..r1 in STREAMS streams, one token at
 * a time, tiles of 4 rows then 1 for the leftover rows. */
AVX2_INLINE void head_rows_avx2(const uint8_t *w, size_t row_bytes, int32_t n_in, int32_t r0,
                                int32_t r1, const float *x, int32_t n_tok, int64_t x_stride,
                                float *y, int64_t y_stride, head_tile_fn tile4, head_tile_fn tile1)
{
    const int32_t len = (r1 - r0) / STREAMS;
    const uint8_t *rows[4];
    const float *xs[1];
    float out[4];
    for (int32_t i = 0; i < len; i++) {
        int32_t rr[4];
        for (int k = 0; k < 4; k++) {
            rr[k] = r0 + k * len + i;
            rows[k] = w + (size_t)rr[k] * row_bytes;
        }
        for (int32_t t = 0; t < n_tok; t++) {
            xs[0] = x + t * x_stride;
            tile4(rows, xs, n_in, out);
            for (int k = 0; k < 4; k++)
                y[t * y_stride + rr[k]] = out[k];
        }
    }
    for (int32_t r = r0 + STREAMS * len; r < r1; r++) {
        rows[0] = w + (size_t)r * row_bytes;
        for (int32_t t = 0; t < n_tok; t++) {
            xs[0] = x + t * x_stride;
            tile1(rows, xs, n_in, out);
            y[t * y_stride + r] = out[0];
        }
    }
}

AVX2_FN static void f16_matmul_avx2(const uint16_t *w, int32_t n_in, int32_t r0, int32_t r1,
                                    const float *x, int32_t n_tok, int64_t x_stride, float *y,
                                    int64_t y_stride)
{
    head_rows_avx2((const uint8_t *)(const void *)w, 2 * (size_t)n_in, n_in, r0, r1, x, n_tok,
                   x_stride, y, y_stride, f16_tile_4x1, f16_tile_1x1);
}

AVX2_FN void bn_f16_row_avx2(const uint16_t *src, int32_t n, float *dst)
{
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = bn_f16_to_f32(src[i]);
}

/* Eight int8 weights as floats times the block scale: exact (model-format §5.3). */
AVX2_INLINE __m256 q8_0_weights8(const uint8_t *q, __m256 d)
{
    const __m128i b = _mm_loadl_epi64((const __m128i *)(const void *)q);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d);
}

/* The Q8_0 head: nr rows times nt tokens. A block's 32 weights are elements e..e+31 of the
 * canonical order, so its four groups of eight go to lanes 0-7, 8-15, 0-7, 8-15: lo and hi as
 * in f16_tile_avx2, in the same sequence of fused multiply-adds. */
AVX2_INLINE void q8_0_tile_avx2(const uint8_t *const *rows, const int nr, const float *const *xs,
                                const int nt, int32_t n_in, float *out)
{
    const size_t row_bytes = (size_t)(n_in / 32) * BN_Q8_0_BLOCK;
    __m256 lo[4], hi[4];
    for (int k = 0; k < nr * nt; k++) {
        lo[k] = _mm256_setzero_ps();
        hi[k] = _mm256_setzero_ps();
    }
    for (int32_t e = 0; e < n_in; e += 32) {
        const size_t off = (size_t)(e / 32) * BN_Q8_0_BLOCK;
        for (int i = 0; i < nr; i++) {
            prefetch_at(rows[i], off + row_bytes); /* the next row of the stream */
            const uint8_t *blk = rows[i] + off;
            uint16_t h;
            memcpy(&h, blk, sizeof h);
            const __m256 d = _mm256_set1_ps(_cvtsh_ss(h));
            const __m256 w0 = q8_0_weights8(blk + 2, d), w1 = q8_0_weights8(blk + 10, d);
            const __m256 w2 = q8_0_weights8(blk + 18, d), w3 = q8_0_weights8(blk + 26, d);
            for (int j = 0; j < nt; j++) {
                const int k = i * nt + j;
                const float *xe = xs[j] + e;
                lo[k] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xe), lo[k]);
                hi[k] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xe + 8), hi[k]);
                lo[k] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xe + 16), lo[k]);
                hi[k] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xe + 24), hi[k]);
            }
        }
    }
    for (int k = 0; k < nr * nt; k++)
        out[k] = reduce16_avx2(lo[k], hi[k]);
}

#define Q8_0_TILE(NR, NT)                                                                          \
    AVX2_FN static void q8_0_tile_##NR##x##NT(const uint8_t *const *rows, const float *const *xs,  \
                                              int32_t n_in, float *out)                            \
    {                                                                                              \
        q8_0_tile_avx2(rows, NR, xs, NT, n_in, out);                                               \
    }
Q8_0_TILE(4, 1)
Q8_0_TILE(1, 1)

AVX2_FN static void q8_0_matmul_avx2(const uint8_t *w, int32_t n_in, int32_t r0, int32_t r1,
                                     const float *x, int32_t n_tok, int64_t x_stride, float *y,
                                     int64_t y_stride)
{
    head_rows_avx2(w, (size_t)(n_in / 32) * BN_Q8_0_BLOCK, n_in, r0, r1, x, n_tok, x_stride, y,
                   y_stride, q8_0_tile_4x1, q8_0_tile_1x1);
}

/* The 64 codes of a Q2_0 block's 16 code bytes qs, in weight order, as two vectors of bytes
 * 0..3 (model-format §10.6.1): byte p of the 32 weights of half h is bits 2*(p%4) of qs[8h +
 * p/4]. Each byte is first copied to its four places (pshufb), then shifted by 0, 2, 4 or 6
 * as its place says (a 16-bit shift by at most 6 keeps a byte's own low bits) and masked. */
AVX2_INLINE void q2_0_codes(const uint8_t *qs, __m256i *lo, __m256i *hi)
{
    const __m256i src = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    const __m256i idx_lo = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4,
                                            4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
    const __m256i idx_hi = _mm256_add_epi8(idx_lo, _mm256_set1_epi8(8));
    const __m256i m1 = _mm256_set1_epi32((int32_t)0x0000FF00);
    const __m256i m2 = _mm256_set1_epi32((int32_t)0x00FF0000);
    const __m256i m3 = _mm256_set1_epi32((int32_t)0xFF000000);
    const __m256i three = _mm256_set1_epi8(3);
    __m256i v[2] = {_mm256_shuffle_epi8(src, idx_lo), _mm256_shuffle_epi8(src, idx_hi)};
    for (int k = 0; k < 2; k++) {
        __m256i r = _mm256_blendv_epi8(v[k], _mm256_srli_epi16(v[k], 2), m1);
        r = _mm256_blendv_epi8(r, _mm256_srli_epi16(v[k], 4), m2);
        r = _mm256_blendv_epi8(r, _mm256_srli_epi16(v[k], 6), m3);
        v[k] = _mm256_and_si256(r, three);
    }
    *lo = v[0];
    *hi = v[1];
}

/* sum(code * q) - sum(q) over one block (model-format §10.6.2), from its decoded codes, with
 * byte products (maddubs: code 0..3 times int8, pairs summed in 16 bits, at most 768 in
 * size). */
AVX2_INLINE int32_t q2_0_block_isum(__m256i c0, __m256i c1, const int8_t *x)
{
    const __m256i ones8 = _mm256_set1_epi8(1);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i x0 = _mm256_loadu_si256((const __m256i *)x);
    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + 32));
    const __m256i p = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(c0, x0), ones16),
                                       _mm256_madd_epi16(_mm256_maddubs_epi16(c1, x1), ones16));
    const __m256i sq = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(ones8, x0), ones16),
                                        _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, x1), ones16));
    return hsum_epi32(_mm256_sub_epi32(p, sq));
}

AVX2_FN void bn_q2_0_isums_avx2(const uint8_t *blocks, const int8_t *q, int32_t n, int32_t *isum)
{
    for (int32_t g = 0; g < n; g++) {
        __m256i c0, c1;
        q2_0_codes(blocks + (size_t)g * BN_Q2_0_BLOCK + 2, &c0, &c1);
        isum[g] = q2_0_block_isum(c0, c1, q + (size_t)g * 64);
    }
}

/* Tokens are taken up to Q2_0_TOK at a time, so each block's codes are decoded once for all
 * of them (batched decode, prefill). */
#define Q2_0_TOK 4

/* Q2_0 rows r0..r1 for every token from natural-layout activations (inputs wider than
 * Q2_0_MAX_TILED, for this set and the AVX-512 ones), in the order of model-format §10.6.2:
 * lanes 0-7 of the float partial sums in lo, 8-15 in hi, one chunk of 16 blocks per step. A
 * short last chunk leaves its missing lanes' isum and d at zero: fma(0, 0, p) is p exactly (p
 * is never -0, since it starts at +0 and a sum is -0 only if both addends are), as if
 * skipped. */
AVX2_FN static void q2_0_natural_avx2(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                                      float *y, int64_t y_stride)
{
    const int32_t nb = w->n_in / 64;
    for (int32_t r = r0; r < r1; r++) {
        const uint8_t *row = w->codes + (size_t)r * (size_t)nb * BN_Q2_0_BLOCK;
        for (int32_t t0 = 0; t0 < a->n_tok; t0 += Q2_0_TOK) {
            const int nt = a->n_tok - t0 < Q2_0_TOK ? a->n_tok - t0 : Q2_0_TOK;
            __m256 lo[Q2_0_TOK], hi[Q2_0_TOK];
            for (int j = 0; j < nt; j++)
                lo[j] = hi[j] = _mm256_setzero_ps();
            for (int32_t g0 = 0; g0 < nb; g0 += Q2_0_LANES) {
                const int32_t n = nb - g0 < Q2_0_LANES ? nb - g0 : Q2_0_LANES;
                int32_t isum[Q2_0_TOK][Q2_0_LANES] = {{0}};
                uint16_t dh[Q2_0_LANES] = {0};
                for (int32_t g = 0; g < n; g++) {
                    const uint8_t *blk = row + (size_t)(g0 + g) * BN_Q2_0_BLOCK;
                    memcpy(&dh[g], blk, sizeof dh[g]);
                    __m256i c0, c1;
                    q2_0_codes(blk + 2, &c0, &c1);
                    for (int j = 0; j < nt; j++)
                        isum[j][g] = q2_0_block_isum(
                            c0, c1, a->q + (size_t)(t0 + j) * a->stride + (size_t)(g0 + g) * 64);
                }
                const __m256 dlo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dh));
                const __m256 dhi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dh + 8)));
                for (int j = 0; j < nt; j++) {
                    const __m256 ilo =
                        _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)isum[j]));
                    const __m256 ihi =
                        _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(isum[j] + 8)));
                    lo[j] = _mm256_fmadd_ps(ilo, dlo, lo[j]);
                    hi[j] = _mm256_fmadd_ps(ihi, dhi, hi[j]);
                }
            }
            for (int j = 0; j < nt; j++)
                y[(t0 + j) * y_stride + r] = reduce16_avx2(lo[j], hi[j]) / a->s[t0 + j];
        }
    }
}

/* ------------------------------------------------------------------ Q2_0, one block per lane
 *
 * As in the AVX-512 sets (x86_avx512.c), a chunk of 16 blocks gives its 16 block sums in
 * lanes, the float lanes of model-format §10.6.2 with no horizontal step: here lanes 0-7 in
 * one register (half 0 of the chunk) and 8-15 in another (half 1). The activations use the
 * same chunk layout (vector 4m + k of 64 bytes, lane i, byte b = activation 64i + 16m + 4b +
 * k), whose 32-byte halves are exactly the two halves' vectors. Without vpdpbusd the products
 * go through vpmaddubsw (code times int8, adjacent pairs summed in int16) and vpmaddwd. */

#define Q2_CHUNK 1024                       /* activations per chunk of 16 blocks */
#define Q2_CHUNK_BYTES (16 * BN_Q2_0_BLOCK) /* its codes and scales */
#define Q2_HALF_BYTES (8 * BN_Q2_0_BLOCK)   /* the 8 blocks of a half */

/* bn_quantize_avx2, then each full chunk of 1024 values (up to Q2_0_MAX_TILED) rearranged
 * into the chunk layout above; the last partial chunk and wider inputs stay natural. */
AVX2_FN static void q2_0_quantize_avx2(const float *x, int32_t n, int8_t *q, float *s_out,
                                       int32_t *qsum)
{
    bn_quantize_avx2(x, n, q, s_out, qsum);
    if (n > Q2_0_MAX_TILED)
        return;
    /* within each 16 activations (one m of a block), 4b + k goes to 4k + b: then dword 4m + k
     * of a block's 64 is its part of vector 4m + k */
    const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15, 0, 4,
                                        8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int32_t c = 0; c + Q2_CHUNK <= n; c += Q2_CHUNK) {
        int8_t *chunk = q + c;
        int32_t blk[16][16]; /* [block i][dword 4m + k] */
        for (int i = 0; i < 16; i++)
            for (int h = 0; h < 2; h++)
                _mm256_storeu_si256(
                    (__m256i *)&blk[i][8 * h],
                    _mm256_shuffle_epi8(
                        _mm256_loadu_si256((const __m256i *)(chunk + 64 * i + 32 * h)), tr));
        int32_t out[16][16]; /* [vector 4m + k][lane i] */
        for (int v = 0; v < 16; v++)
            for (int i = 0; i < 16; i++)
                out[v][i] = blk[i][v];
        memcpy(chunk, out, sizeof out);
    }
}

/* The codes of the 8 blocks at blk transposed: W[m] lane i = code bytes 4m..4m+3 of block i
 * (its weights 16m..16m+15, weight 16m + 4b + k at bits 2k of byte b). */
AVX2_INLINE void q2_half_codes(const uint8_t *blk, __m256i W[4])
{
    /* z[r]: the 16 code bytes of block r in the low 128-bit lane, of block r + 4 in the high */
    __m256i z[4];
    for (int r = 0; r < 4; r++) {
        const uint8_t *b = blk + (size_t)r * BN_Q2_0_BLOCK + 2;
        z[r] =
            _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)b)),
                                    _mm_loadu_si128((const __m128i *)(b + 4 * BN_Q2_0_BLOCK)), 1);
    }
    /* a 4 x 4 dword transpose in each 128-bit lane */
    const __m256i lo01 = _mm256_unpacklo_epi32(z[0], z[1]),
                  hi01 = _mm256_unpackhi_epi32(z[0], z[1]);
    const __m256i lo23 = _mm256_unpacklo_epi32(z[2], z[3]),
                  hi23 = _mm256_unpackhi_epi32(z[2], z[3]);
    W[0] = _mm256_unpacklo_epi64(lo01, lo23);
    W[1] = _mm256_unpackhi_epi64(lo01, lo23);
    W[2] = _mm256_unpacklo_epi64(hi01, hi23);
    W[3] = _mm256_unpackhi_epi64(hi01, hi23);
}

/* The scales of the 8 blocks at blk as floats (lane i = block i). Scale i is at byte 18i =
 * 16i + 2i: word i of the i-th 16 bytes. So word blends of bytes 0..127, loaded as four
 * 32-byte vectors, gather the even scales in the low 128-bit lane and the odd ones in the
 * high, each at its own word, and one more blend merges the lanes: no gather, no inserts. */
AVX2_INLINE __m256 q2_half_scales(const uint8_t *blk)
{
    __m256i v = _mm256_loadu_si256((const __m256i *)blk);
    v = _mm256_blend_epi16(v, _mm256_loadu_si256((const __m256i *)(blk + 32)), 0x0C);
    v = _mm256_blend_epi16(v, _mm256_loadu_si256((const __m256i *)(blk + 64)), 0x30);
    v = _mm256_blend_epi16(v, _mm256_loadu_si256((const __m256i *)(blk + 96)), 0xC0);
    return _mm256_cvtph_ps(
        _mm_blend_epi16(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1), 0xAA));
}

/* Per block, sum(q) over its 64 activations, for the two halves of a chunk (lanes as the
 * codes): maddubs by ones adds pairs (at most 256 in size), 16 of those fit int16. */
AVX2_INLINE void q2_chunk_qsums(const int8_t *act, __m256i s[2])
{
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) {
        __m256i acc = _mm256_setzero_si256();
        for (int v = 0; v < 16; v++)
            acc = _mm256_add_epi16(
                acc, _mm256_maddubs_epi16(
                         ones8, _mm256_loadu_si256((const __m256i *)(act + 64 * v + 32 * h))));
        s[h] = _mm256_madd_epi16(acc, ones16);
    }
}

/* NR rows (from distant parts of the range) and NT tokens over nch full chunks: p[2 * (i * NT
 * + t) + h] += the chunks' lanes 8h..8h+7 of §10.6.2 for row i and token t.
 *
 * Planes 0 and 2 of a code byte are taken as 0..3 (c & 3, (c >> 4) & 3), planes 1 and 3 in
 * place, 4 times their code (c & 12, (c >> 4) & 12): one shift and four ands per 32 code
 * bytes. maddubs pairs are then at most 2*3*128 = 768 (planes 0, 2) and 4 * 768 = 3072 (1, 3)
 * in size, so the four m of a half sum in int16 (8 pairs each: 6144 and 24576 < 32768)
 * before one widening each; the second is an exact multiple of 4, shifted back. */
AVX2_INLINE void q2_0_tile(const uint8_t *const *rows, const int nr, int32_t nch,
                           const int8_t *const *acts, const __m256i *const *qsums, const int nt,
                           size_t next_row, __m256 *p)
{
    const __m256i m3 = _mm256_set1_epi8(0x03), m12 = _mm256_set1_epi8(0x0C);
    const __m256i ones16 = _mm256_set1_epi16(1);
    for (int32_t c = 0; c < nch; c++) {
        for (int i = 0; i < nr; i++) {
            const uint8_t *blk = rows[i] + (size_t)c * Q2_CHUNK_BYTES;
            /* the same chunk of the stream's next row into L2, as the AVX-512 kernel does */
            for (size_t l = 0; l < Q2_CHUNK_BYTES; l += 64)
                _mm_prefetch((const char *)((uintptr_t)blk + next_row + l), _MM_HINT_T1);
            for (int h = 0; h < 2; h++) {
                __m256i W[4];
                q2_half_codes(blk + h * Q2_HALF_BYTES, W);
                __m256i s1[Q2_0_TOK], s4[Q2_0_TOK];
                for (int t = 0; t < nt; t++)
                    s1[t] = s4[t] = _mm256_setzero_si256();
                for (int m = 0; m < 4; m++) {
                    const __m256i hi = _mm256_srli_epi16(W[m], 4);
                    const __m256i p0 = _mm256_and_si256(W[m], m3), p1 = _mm256_and_si256(W[m], m12);
                    const __m256i p2 = _mm256_and_si256(hi, m3), p3 = _mm256_and_si256(hi, m12);
                    for (int t = 0; t < nt; t++) {
                        const int8_t *av = acts[t] + (size_t)c * Q2_CHUNK + 64 * (4 * m) + 32 * h;
                        __m256i a1 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(p0, _mm256_loadu_si256((const __m256i *)av)),
                            _mm256_maddubs_epi16(p2,
                                                 _mm256_loadu_si256((const __m256i *)(av + 128))));
                        __m256i a4 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(p1,
                                                 _mm256_loadu_si256((const __m256i *)(av + 64))),
                            _mm256_maddubs_epi16(p3,
                                                 _mm256_loadu_si256((const __m256i *)(av + 192))));
                        s1[t] = _mm256_add_epi16(s1[t], a1);
                        s4[t] = _mm256_add_epi16(s4[t], a4);
                        /* an empty asm keeps each sum a chain: GCC otherwise regrouped the
                         * tokens' products into one tree, computed all 64 first and
                         * spilled them (measured: a third more time at 4 tokens) */
                        __asm__("" : "+x"(s1[t]), "+x"(s4[t]));
                    }
                }
                const __m256 d = q2_half_scales(blk + h * Q2_HALF_BYTES);
                for (int t = 0; t < nt; t++) {
                    const __m256i tot =
                        _mm256_add_epi32(_mm256_madd_epi16(s1[t], ones16),
                                         _mm256_srai_epi32(_mm256_madd_epi16(s4[t], ones16), 2));
                    const __m256i isum = _mm256_sub_epi32(tot, qsums[t][2 * c + h]);
                    __m256 *pp = &p[2 * (i * nt + t) + h];
                    *pp = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, *pp);
                }
            }
        }
    }
}

#define Q2_0_TILE(NR, NT)                                                                          \
    AVX2_FN static void q2_0_tile_##NR##x##NT(                                                     \
        const uint8_t *const *rows, int32_t nch, const int8_t *const *acts,                        \
        const __m256i *const *qsums, size_t next_row, __m256 *p)                                   \
    {                                                                                              \
        q2_0_tile(rows, NR, nch, acts, qsums, NT, next_row, p);                                    \
    }
Q2_0_TILE(1, 1)
Q2_0_TILE(1, 2)
Q2_0_TILE(1, 3)
Q2_0_TILE(1, 4)
Q2_0_TILE(4, 1)
Q2_0_TILE(4, 2)
Q2_0_TILE(4, 3)
Q2_0_TILE(4, 4)

typedef void (*q2_0_tile_fn)(const uint8_t *const *, int32_t, const int8_t *const *,
                             const __m256i *const *, size_t, __m256 *);
static const q2_0_tile_fn q2_0_tiles[2][4] = {
    {q2_0_tile_1x1, q2_0_tile_1x2, q2_0_tile_1x3, q2_0_tile_1x4},
    {q2_0_tile_4x1, q2_0_tile_4x2, q2_0_tile_4x3, q2_0_tile_4x4},
};

/* The blocks of the last partial chunk (natural layout) into lanes 0..rem-1 of p[2t], p[2t +
 * 1] (the missing lanes get fma(0, 0, p) = p, see q2_0_natural_avx2), then y = (the tree of
 * the lanes) / s, for one row and nt tokens. */
AVX2_FN static void q2_0_finish(const uint8_t *row, int32_t nch, int32_t rem,
                                const int8_t *const *acts, const float *s, int nt, __m256 *p,
                                float *y, int64_t y_stride)
{
    if (rem) {
        const uint8_t *blk = row + (size_t)nch * Q2_CHUNK_BYTES;
        uint16_t dh[16] = {0};
        for (int32_t g = 0; g < rem; g++)
            memcpy(&dh[g], blk + (size_t)g * BN_Q2_0_BLOCK, sizeof dh[g]);
        const __m256 d[2] = {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dh)),
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dh + 8)))};
        for (int t = 0; t < nt; t++) {
            int32_t isum[16] = {0};
            bn_q2_0_isums_avx2(blk, acts[t] + (size_t)nch * Q2_CHUNK, rem, isum);
            for (int h = 0; h < 2; h++)
                p[2 * t + h] = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(isum + 8 * h))), d[h],
                    p[2 * t + h]);
        }
    }
    for (int t = 0; t < nt; t++)
        y[t * y_stride] = reduce16_avx2(p[2 * t], p[2 * t + 1]) / s[t];
}

/* What the units of q2_0_schedule share. */
typedef struct {
    q2_0_call c;
    __m256i qsum[Q2_0_QSUM_BYTES / 32]; /* two per token of the group and chunk */
} q2_0_run;

AVX2_FN static void q2_0_sums(void *arg, int32_t g0, int32_t gn)
{
    q2_0_run *run = arg;
    const bn_qact *a = run->c.a;
    for (int32_t t = 0; t < gn; t++)
        for (int32_t c = 0; c < run->c.nch; c++)
            q2_chunk_qsums(a->q + (size_t)(g0 + t) * a->stride + (size_t)c * Q2_CHUNK,
                           &run->qsum[2 * (t * run->c.nch + c)]);
}

AVX2_FN static void q2_0_unit_avx2(void *arg, const q2_0_unit *u)
{
    q2_0_run *run = arg;
    const size_t row_bytes = (size_t)(run->c.w->n_in / 64) * BN_Q2_0_BLOCK;
    const __m256i *qs[4];
    for (int j = 0; j < u->nt; j++)
        qs[j] = run->qsum + (size_t)2 * (u->tg + j) * run->c.nch;
    __m256 p[2 * STREAMS * 4];
    for (int k = 0; k < 2 * u->nr * u->nt; k++)
        p[k] = _mm256_setzero_ps();
    if (run->c.nch)
        q2_0_tiles[u->nr > 1][u->nt - 1](u->rows, run->c.nch, u->acts, qs, row_bytes, p);
    for (int k = 0; k < u->nr; k++)
        q2_0_finish(u->rows[k], run->c.nch, run->c.rem, u->acts, run->c.a->s + u->t0, u->nt,
                    p + 2 * k * u->nt, run->c.y + u->t0 * run->c.y_stride + u->rr[k],
                    run->c.y_stride);
}

/* Rows r0..r1 for every token, in q2_0_schedule's order (kernels.h). */
AVX2_FN void bn_q2_0_avx2(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a, float *y,
                          int64_t y_stride)
{
    if (w->n_in > Q2_0_MAX_TILED) { /* natural layout (both quantizers) */
        q2_0_natural_avx2(w, r0, r1, a, y, y_stride);
        return;
    }
    q2_0_run run; /* not initialized as a whole: that would clear the 32 KiB of sums */
    run.c = q2_0_call_of(w, a, y, y_stride);
    q2_0_schedule(w, r0, r1, a, q2_0_sums, q2_0_unit_avx2, &run);
}

const bn_kernel_set bn_kernels_avx2 = {
    .name = "avx2",
    .quantize = bn_quantize_avx2,
    .prepare = NULL,
    .ternary = ternary_avx2,
    .q2_0 = bn_q2_0_avx2,
    .q2_0_quantize = q2_0_quantize_avx2,
    .f16_matmul = f16_matmul_avx2,
    .q8_0_matmul = q8_0_matmul_avx2,
};

#endif /* BN_X86 */
