/* x86_avx2.c - the kernel set "avx2" (AVX2 + FMA + F16C): BitLinear with maddubs into int16
 * partial sums widened to int32 often enough never to overflow, the F16 head with 8-lane FMA
 * accumulators, and the vector F16 row conversion.
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

#define F16_TILE(NR, NT)                                                                           \
    AVX2_FN static void f16_tile_##NR##x##NT(const uint16_t *const *rows, const float *const *xs,  \
                                             int32_t n_in, float *out)                             \
    {                                                                                              \
        f16_tile_avx2(rows, NR, xs, NT, n_in, out);                                                \
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

AVX2_FN void bn_f16_row_avx2(const uint16_t *src, int32_t n, float *dst)
{
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++)
        dst[i] = bn_f16_to_f32(src[i]);
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

/* Q2_0 rows r0..r1 for every token in the order of model-format §10.6.2: lanes 0-7 of the
 * float partial sums in lo, 8-15 in hi, one chunk of 16 blocks per step. A short last chunk
 * leaves its missing lanes' isum and d at zero: fma(0, 0, p) is p exactly (p is never -0,
 * since it starts at +0 and a sum is -0 only if both addends are), as if skipped. */
AVX2_FN void bn_q2_0_avx2(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a, float *y,
                          int64_t y_stride)
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

const bn_kernel_set bn_kernels_avx2 = {
    .name = "avx2",
    .quantize = bn_quantize_avx2,
    .prepare = NULL,
    .ternary = ternary_avx2,
    .q2_0 = bn_q2_0_avx2,
    .q2_0_quantize = bn_quantize_avx2,
    .f16_matmul = f16_matmul_avx2,
};

#endif /* BN_X86 */
