/* x86_amx.c - the kernel set "amx" (AMX-TILE + AMX-INT8 for BitLinear, AVX-512 for the rest).
 *
 * Sapphire Rapids and later: TDPBUSD multiplies a 16x64 tile of unsigned bytes by a 64x16
 * tile of signed bytes into 16x16 int32 sums in one instruction. The 2-bit codes of 64 rows
 * are unpacked into byte tiles (one plane of a block pair per tile row, the same paired layout
 * as the AVX-512 activations), the activations of up to 16 tokens are regrouped once per call
 * into the tile layout (4 consecutive inputs per token per row). Exact int32 sums: the same
 * results as every other kernel. Used for four or more tokens; fewer keep the AVX-512 path
 * (faster there, measured). */
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

const bn_kernel_set bn_kernels_amx = {
    .name = "amx",
    .quantize = bn_quantize_avx512,
    .prepare = prepare_amx,
    .ternary = ternary_amx,
    .q2_0 = bn_q2_0_avx512,
    .q2_0_quantize = bn_q2_0_quantize_avx512,
    .f16_matmul = bn_f16_matmul_avx512,
};

#endif /* BN_HAVE_AMX */
