/* x86_amx.c - the kernel set "amx" (AMX-TILE + AMX-INT8 for BitLinear, AVX-512 for the rest).
 *
 * Sapphire Rapids and later: TDPBUSD multiplies a 16x64 tile of unsigned bytes by a 64x16
 * tile of signed bytes into 16x16 int32 sums in one instruction. The 2-bit codes of 64 rows
 * are unpacked into byte tiles (one plane of a block pair per tile row, the same paired layout
 * as the AVX-512 activations), the activations of up to 16 tokens are regrouped once per call
 * into the tile layout (4 consecutive inputs per token per row). Exact int32 sums: the same
 * results as every other kernel. Used for four or more tokens; fewer keep the AVX-512 path
 * (faster there, measured). Q2_0 prefill uses the tiles too (one product per block, section
 * below); its decode is the AVX-512 kernel. */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"

#ifdef BN_HAVE_AMX

#define AMX_FN                                                                                     \
    __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,"           \
                          "fma,f16c")))
#define AMX_ROWS 64 /* rows per pass: four 16-row accumulator tiles */
#define AMX_MAX_TOK 16

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_tilecfg;

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
            const __m512i idx =
                _mm512_add_epi32(_mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8,
                                                                     7, 6, 5, 4, 3, 2, 1, 0),
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
AMX_FN static void ternary_amx_rows(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a,
                                    int32_t t0, int32_t n, float *y, int64_t y_stride)
{
    const int32_t nb = w->n_in / 128, npairs = nb / 2;
    const size_t row_bytes = (size_t)w->n_in / 4;
    const size_t b_tile = (size_t)16 * n * 4;
    const int8_t *bt = a->tiles + (size_t)t0 * w->n_in;
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 4; t++) { /* tmm0-3: 16 rows x n int32 accumulators */
        cfg.rows[t] = 16;
        cfg.colsb[t] = (uint16_t)(n * 4);
    }
    cfg.rows[4] = 16; /* tmm4: 16 rows x 64 code bytes */
    cfg.colsb[4] = 64;
    cfg.rows[5] = 16; /* tmm5: 16 x (n tokens x 4) activation bytes */
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
            if (p < npairs) { /* unpack pair p */
                uint8_t(*ab)[4][16][64] = abuf[p & 1];
                for (int m = 0; m < AMX_ROWS; m++) {
                    const uint8_t *row = w->codes + (size_t)(rb + m) * row_bytes + 64 * (size_t)p;
                    prefetch_at(row, row_bytes * AMX_ROWS); /* this row in the next pass */
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
            __asm__ volatile("" ::: "memory"); /* the tile loads below read abuf */
            const int32_t q = p - 1;           /* multiply pair q = p - 1 */
            uint8_t(*ab)[4][16][64] = abuf[q & 1];
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
            if (nb % 2) { /* odd last block, natural layout */
                const uint8_t *row = w->codes + (size_t)r * row_bytes;
                for (int32_t j = 0; j < n; j++)
                    cbuf[m / 16][m % 16][j] += bn_ternary_dot_scalar(
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
    if (n_tok < 4 || !a->tiles || w->n_in < 256) { /* 2-3 tokens: AVX-512 is faster */
        bn_ternary_avx512(w, r0, r1, a, y, y_stride);
        return;
    }
    const int32_t r_amx = r0 + (r1 - r0) / AMX_ROWS * AMX_ROWS;
    for (int32_t t = 0; t < n_tok && r_amx > r0; t += AMX_MAX_TOK) {
        const int32_t n = n_tok - t < AMX_MAX_TOK ? n_tok - t : AMX_MAX_TOK;
        ternary_amx_rows(w, r0, r_amx, a, t, n, y, y_stride);
    }
    if (r_amx < r1)
        bn_ternary_avx512(w, r_amx, r1, a, y, y_stride);
}

/* ------------------------------------------------------------------ Q2_0 (model-format §10.6)
 *
 * Prefill (many tokens): one TDPBSSD per Q2_0 block, 16 tokens x 16 rows, gives the exact
 * int32 block sums isum_g of §10.6.2 directly (the codes are unpacked to the signed weights
 * code - 1, so no activation sums are subtracted). The float order then follows §10.6.2: a
 * tile's row t holds token t's sums for 16 weight rows, so with one vector per token over
 * those rows, block g's step is fma((float)isum_g, d_g of the 16 rows, p_{g % 16}) lane by
 * lane. The lanes g % 16 are independent chains: all the blocks of lane l (g = l, l + 16,
 * ...) run back to back with the lane's 16 token vectors in registers, and the finished
 * lanes meet in sum16's tree per token at the end of the row group. Decode (few tokens) keeps
 * the AVX-512 kernel, which streams the weights at memory speed.
 *
 * Within a tile, the 64 activations of a block may come in any order as long as the codes
 * use the same one: the order of the AVX-512 chunk layout (x86_avx512.c) makes both cheap.
 * Tile row position 4v + b (v = 4m + k) holds weight 16m + 4b + k of the block: for the
 * activations, dword v of the block's column in a chunk (a 16 x 16 dword transpose per chunk);
 * for the codes, bits 2k of code byte 4m + b, i.e. dword m of the block's codes shifted right
 * by 2k (the AVX-512 kernel's planes). */

#define AMX_INLINE                                                                                 \
    __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx2,"           \
                          "fma,f16c"),                                                             \
                   always_inline)) static inline
/* Fewer tokens keep bn_q2_0_avx512: a token group of 16 costs the same with fewer tokens in
 * it, 1.5x the AVX-512 speed at 12 tokens, 2x at 16, about 4x from 64 on (measured). */
#define Q2A_MIN_TOK 12
#define Q2A_TILE 1024 /* bytes of one 16 x 64 tile */
/* Activation tiles of at most this size at once (half the L2 of Sapphire Rapids): they are
 * read again for every row group, and from L3 they slowed wide inputs (measured). */
#define Q2A_ACT_BYTES (1 << 20)

/* In place: r[i] dword v becomes r[v] dword i. */
AMX_FN static inline void transpose16_epi32(__m512i r[16])
{
    __m512i x[4][4]; /* [row group R][s]: 128-bit lane j = column 4j + s of rows 4R..4R+3 */
    for (int R = 0; R < 4; R++) {
        const __m512i lo01 = _mm512_unpacklo_epi32(r[4 * R], r[4 * R + 1]);
        const __m512i hi01 = _mm512_unpackhi_epi32(r[4 * R], r[4 * R + 1]);
        const __m512i lo23 = _mm512_unpacklo_epi32(r[4 * R + 2], r[4 * R + 3]);
        const __m512i hi23 = _mm512_unpackhi_epi32(r[4 * R + 2], r[4 * R + 3]);
        x[R][0] = _mm512_unpacklo_epi64(lo01, lo23);
        x[R][1] = _mm512_unpackhi_epi64(lo01, lo23);
        x[R][2] = _mm512_unpacklo_epi64(hi01, hi23);
        x[R][3] = _mm512_unpackhi_epi64(hi01, hi23);
    }
    for (int s = 0; s < 4; s++) { /* a 4 x 4 transpose of 128-bit lanes */
        const __m512i u0 = _mm512_shuffle_i32x4(x[0][s], x[1][s], 0x44);
        const __m512i u1 = _mm512_shuffle_i32x4(x[0][s], x[1][s], 0xEE);
        const __m512i u2 = _mm512_shuffle_i32x4(x[2][s], x[3][s], 0x44);
        const __m512i u3 = _mm512_shuffle_i32x4(x[2][s], x[3][s], 0xEE);
        r[s] = _mm512_shuffle_i32x4(u0, u2, 0x88);
        r[4 + s] = _mm512_shuffle_i32x4(u0, u2, 0xDD);
        r[8 + s] = _mm512_shuffle_i32x4(u1, u3, 0x88);
        r[12 + s] = _mm512_shuffle_i32x4(u1, u3, 0xDD);
    }
}

/* Tiles are stored lane by lane, so that everything one lane's loop reads is contiguous:
 * block g = 16c + l is entry off[l] + c of the lane-ordered list, lane l having nbl(l)
 * blocks (the full chunks, plus one if block 16 * nch + l exists). */
typedef struct {
    int32_t nch, rem, nb, ntg;
    int32_t off[Q2_0_LANES + 1];
} q2a_layout;

static inline int32_t q2a_nbl(const q2a_layout *L, int l)
{
    return L->nch + (l < L->rem);
}

/* Activation tiles of the ntg token groups from token t0, A[off[l] * ntg + tg * nbl + c]: row
 * t = token t0 + 16 tg + t's block 16c + l in the tile order (zeros past the last token). */
AMX_FN static void q2a_act_tiles(const bn_qact *a, int32_t t0, const q2a_layout *L, int8_t *A)
{
    const __m512i tr4 =
        _mm512_broadcast_i32x4(_mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    for (int32_t t = t0; t < t0 + L->ntg * 16; t++) {
        const int32_t tg = (t - t0) / 16, tr = t % 16;
        const int8_t *q = a->q + (size_t)t * a->stride;
        for (int32_t c = 0; c < L->nch; c++) {
            __m512i r[16];
            for (int v = 0; v < 16; v++)
                r[v] =
                    t < a->n_tok
                        ? _mm512_loadu_si512((const void *)(q + 1024 * (size_t)c + 64 * (size_t)v))
                        : _mm512_setzero_si512();
            transpose16_epi32(r);
            for (int l = 0; l < 16; l++) {
                const size_t e = (size_t)L->off[l] * L->ntg + (size_t)tg * q2a_nbl(L, l) + c;
                _mm512_store_si512((void *)(A + e * Q2A_TILE + 64 * tr), r[l]);
            }
        }
        for (int l = 0; l < L->rem; l++) { /* the partial chunk: natural layout */
            const __m512i v =
                t < a->n_tok
                    ? _mm512_shuffle_epi8(
                          _mm512_loadu_si512((const void *)(q + 64 * ((size_t)L->nch * 16 + l))),
                          tr4)
                    : _mm512_setzero_si512();
            const size_t e = (size_t)L->off[l] * L->ntg + (size_t)tg * q2a_nbl(L, l) + L->nch;
            _mm512_store_si512((void *)(A + e * Q2A_TILE + 64 * tr), v);
        }
    }
}

/* Code tiles and scales of the 16 rows at rows[] for every block: B[off[l] + c] row 4m + k,
 * dword n = the weights code - 1 of row n at tile positions 4(4m + k) .. +3; D[same][n] = d. */
AMX_FN static void q2a_code_tiles(const uint8_t *const rows[16], const q2a_layout *L, int8_t *B,
                                  float *D)
{
    const __m512i m3 = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
    for (int32_t g = 0; g < L->nb; g++) {
        const size_t e = (size_t)L->off[g % 16] + (size_t)(g / 16);
        const size_t boff = (size_t)g * BN_Q2_0_BLOCK;
        /* z[r], 128-bit lane j: the 16 code bytes of row 4j + r; after the transpose W[m]
         * dword n is dword m of row n's codes */
        __m512i z[4];
        for (int r = 0; r < 4; r++) {
            __m512i v =
                _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rows[r] + boff + 2)));
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[4 + r] + boff + 2)),
                                   1);
            v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(rows[8 + r] + boff + 2)),
                                   2);
            z[r] = _mm512_inserti32x4(
                v, _mm_loadu_si128((const __m128i *)(rows[12 + r] + boff + 2)), 3);
        }
        const __m512i lo01 = _mm512_unpacklo_epi32(z[0], z[1]),
                      hi01 = _mm512_unpackhi_epi32(z[0], z[1]);
        const __m512i lo23 = _mm512_unpacklo_epi32(z[2], z[3]),
                      hi23 = _mm512_unpackhi_epi32(z[2], z[3]);
        const __m512i W[4] = {_mm512_unpacklo_epi64(lo01, lo23), _mm512_unpackhi_epi64(lo01, lo23),
                              _mm512_unpacklo_epi64(hi01, hi23), _mm512_unpackhi_epi64(hi01, hi23)};
        int8_t *b = B + e * Q2A_TILE;
        for (int m = 0; m < 4; m++)
            for (int k = 0; k < 4; k++)
                _mm512_store_si512(
                    (void *)(b + 64 * (4 * m + k)),
                    _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi32(W[m], 2 * k), m3), one));
        uint16_t h[16];
        for (int n = 0; n < 16; n++)
            memcpy(&h[n], rows[n] + boff, sizeof h[n]);
        _mm512_store_ps(D + 16 * e, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h)));
    }
}

/* Per entry of the lane-ordered activation tiles: its code tile (and scales) index, and
 * where the lane's 16 token vectors go when it is the last block of its lane and token group
 * (else -1). */
typedef struct {
    int32_t b;
    int32_t p;
} q2a_entry;

/* One tile product of entry e into sums tile C, through operand tiles TA, TB. */
#define Q2A_DP(C, TA, TB, e)                                                                       \
    do {                                                                                           \
        _tile_loadd(TA, A + (size_t)(e)*Q2A_TILE, 64);                                             \
        _tile_loadd(TB, B + (size_t)ent[e].b * Q2A_TILE, 64);                                      \
        _tile_dpbssd(C, TA, TB);                                                                   \
    } while (0)

/* Entries e .. e + 3 (those below total) into the sums tiles 0-3, stored to buf[0..3]. The
 * tile instructions go through the tile unit in order, and a store waits for its product:
 * all four products are issued before the first store, so they run back to back instead of
 * one product's latency per block (measured: the stores were the bottleneck). */
AMX_INLINE void q2a_group(const int8_t *A, const int8_t *B, const q2a_entry *ent, int32_t e,
                          int32_t total, int32_t (*buf)[16][16])
{
    const int32_t n = total - e < 4 ? total - e : 4;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    Q2A_DP(0, 4, 5, e);
    if (n > 1)
        Q2A_DP(1, 6, 7, e + 1);
    if (n > 2)
        Q2A_DP(2, 4, 5, e + 2);
    if (n > 3)
        Q2A_DP(3, 6, 7, e + 3);
    _tile_stored(0, buf[0], 64);
    if (n > 1)
        _tile_stored(1, buf[1], 64);
    if (n > 2)
        _tile_stored(2, buf[2], 64);
    if (n > 3)
        _tile_stored(3, buf[3], 64);
    __asm__ volatile("" ::: "memory"); /* the float steps read buf */
}

/* The float steps of §10.6.2 for entries e .. e + 3 (below total) from their stored sums. */
AMX_INLINE void q2a_floats(const q2a_entry *ent, int32_t e, int32_t total, const float *D,
                           int32_t (*buf)[16][16], __m512 p[16], float *P)
{
    for (int u = 0; u < 4 && e + u < total; u++) {
        const q2a_entry en = ent[e + u];
        const __m512 d = _mm512_load_ps(D + 16 * (size_t)en.b);
        for (int t = 0; t < 16; t++)
            p[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512((const void *)buf[u][t])),
                                   d, p[t]);
        if (en.p >= 0)
            for (int t = 0; t < 16; t++) {
                _mm512_store_ps(P + en.p + 16 * Q2_0_LANES * (size_t)t, p[t]);
                p[t] = _mm512_setzero_ps();
            }
    }
}

/* All lanes of one row group for every token group: the lane-ordered entries as one
 * stream, the tile products of the next four entries issued before the float steps of the
 * current four. */
AMX_FN static void q2a_rows(const int8_t *A, const int8_t *B, const float *D, const q2a_entry *ent,
                            int32_t total, float *P)
{
    __m512 p[16];
    for (int t = 0; t < 16; t++)
        p[t] = _mm512_setzero_ps();
    int32_t cb[2][4][16][16] __attribute__((aligned(64)));
    q2a_group(A, B, ent, 0, total, cb[0]);
    for (int32_t e = 0, k = 0; e < total; e += 4, k ^= 1) {
        if (e + 4 < total)
            q2a_group(A, B, ent, e + 4, total, cb[k ^ 1]);
        q2a_floats(ent, e, total, D, cb[k], p, P);
    }
}

AMX_FN static void q2_0_amx(const bn_ternary *w, int32_t r0, int32_t r1, const bn_qact *a, float *y,
                            int64_t y_stride)
{
    if (a->n_tok < Q2A_MIN_TOK || w->n_in > Q2_0_MAX_TILED) {
        bn_q2_0_avx512(w, r0, r1, a, y, y_stride);
        return;
    }
    q2a_layout L;
    L.nb = w->n_in / 64;
    L.nch = L.nb / 16;
    L.rem = L.nb % 16;
    L.off[0] = 0;
    for (int l = 0; l < Q2_0_LANES; l++)
        L.off[l + 1] = L.off[l] + q2a_nbl(&L, l);
    const size_t row_bytes = (size_t)L.nb * BN_Q2_0_BLOCK;
    /* Tokens in super-groups whose activation tiles stay in L2 while the row groups pass;
     * each super-group unpacks the codes again (balanced group sizes). */
    const int32_t ntg_all = (a->n_tok + 15) / 16;
    int32_t sg = (int32_t)(Q2A_ACT_BYTES / ((size_t)16 * w->n_in));
    sg = sg < 1 ? 1 : sg > ntg_all ? ntg_all : sg;
    const int32_t n_sg = (ntg_all + sg - 1) / sg;
    sg = (ntg_all + n_sg - 1) / n_sg;
    int8_t *A = aligned_alloc(64, (size_t)sg * L.nb * Q2A_TILE);
    int8_t *B = aligned_alloc(64, (size_t)L.nb * Q2A_TILE);
    float *D = aligned_alloc(64, (size_t)L.nb * 64);
    /* [token][lane][row of the group]: the finished lanes until the tree */
    float *P = aligned_alloc(64, (size_t)sg * 16 * Q2_0_LANES * 64);
    q2a_entry *ent = malloc((size_t)sg * L.nb * sizeof *ent);
    if (!A || !B || !D || !P || !ent) {
        free(ent);
        free(A);
        free(B);
        free(D);
        free(P);
        bn_q2_0_avx512(w, r0, r1, a, y, y_stride);
        return;
    }
    amx_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) { /* tmm0-3 sums, tmm4-7 activations and codes */
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    for (int32_t t0 = 0; t0 < a->n_tok; t0 += 16 * sg) {
        L.ntg = (a->n_tok - t0 + 15) / 16 < sg ? (a->n_tok - t0 + 15) / 16 : sg;
        const int32_t t1 = t0 + 16 * L.ntg < a->n_tok ? t0 + 16 * L.ntg : a->n_tok;
        const int32_t total = L.ntg * L.nb;
        q2a_act_tiles(a, t0, &L, A);
        /* lanes without blocks (fewer than 16 blocks) stay +0, as in §10.6.2 */
        memset(P, 0, (size_t)L.ntg * 16 * Q2_0_LANES * 64);
        for (int32_t l = 0, e = 0; l < Q2_0_LANES; l++)
            for (int32_t tg = 0; tg < L.ntg; tg++)
                for (int32_t c = 0; c < q2a_nbl(&L, l); c++, e++) {
                    ent[e].b = L.off[l] + c;
                    ent[e].p = c + 1 < q2a_nbl(&L, l) ? -1 : (tg * 16 * Q2_0_LANES + l) * 16;
                }
        for (int32_t rb = r0; rb < r1; rb += 16) {
            const int32_t nr = r1 - rb < 16 ? r1 - rb : 16;
            const uint8_t *rows[16];
            for (int n = 0; n < 16; n++) /* past the range: repeat its last row, results unused */
                rows[n] = w->codes + (size_t)(n < nr ? rb + n : r1 - 1) * row_bytes;
            q2a_code_tiles(rows, &L, B, D);
            q2a_rows(A, B, D, ent, total, P);
            /* sum16's tree over the lanes, 16 rows at once, and the division by s */
            const __mmask16 live = (__mmask16)((1u << nr) - 1);
            for (int32_t t = t0; t < t1; t++) {
                const float *pt = P + (size_t)(t - t0) * Q2_0_LANES * 16;
                __m512 s8[8], s4[4];
                for (int l = 0; l < 8; l++)
                    s8[l] = _mm512_add_ps(_mm512_load_ps(pt + 16 * l),
                                          _mm512_load_ps(pt + 16 * (l + 8)));
                for (int l = 0; l < 4; l++)
                    s4[l] = _mm512_add_ps(s8[l], s8[l + 4]);
                const __m512 sum =
                    _mm512_add_ps(_mm512_add_ps(s4[0], s4[2]), _mm512_add_ps(s4[1], s4[3]));
                _mm512_mask_storeu_ps(y + t * y_stride + rb, live,
                                      _mm512_div_ps(sum, _mm512_set1_ps(a->s[t])));
            }
        }
    }
    _tile_release();
    free(ent);
    free(A);
    free(B);
    free(D);
    free(P);
}

const bn_kernel_set bn_kernels_amx = {
    .name = "amx",
    .quantize = bn_quantize_avx512,
    .prepare = prepare_amx,
    .ternary = ternary_amx,
    .q2_0 = q2_0_amx,
    .q2_0_quantize = bn_q2_0_quantize_avx512,
    .f16_matmul = bn_f16_matmul_avx512,
    .q8_0_matmul = bn_q8_0_matmul_avx512, /* the head is float work: no tiles */
};

#endif /* BN_HAVE_AMX */
