/* kernel_harness.c - every kernel set against the scalar one, under ASan/UBSan (I2_S and Q2_0
 * products, and the Q8_0 head's).
 *
 * The Python tests (test_kernels.py) check the SIMD sets bit for bit against the scalar set
 * through the extension module, which is built without sanitizers. This program runs the same
 * products, built with -fsanitize=address,undefined by test_gguf_malformed.py, over shapes
 * that reach every path of the kernels: partial chunks and tiles, row and token tails, the
 * decode (few tokens) and prefill (many tokens) paths, and 1 to 3 threads. It prints one line
 * per kernel set and exits 1 on any difference from the scalar result. */
#include "bitnet.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint32_t rng_state = 0x9e3779b9u;

static uint32_t next_random(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 17;
    rng_state ^= rng_state << 5;
    return rng_state;
}

/* Activations of moderate size with a few large ones, so quantization uses the whole int8
 * range. */
static void fill_activations(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++)
        x[i] = (float)((int32_t)(next_random() % 2001) - 1000) / 100.0f;
    for (size_t i = 0; i < n; i += 97)
        x[i] *= 40.0f;
}

/* I2_S codes are 0..2 (3 never occurs in a valid file); the scale sits after the codes. */
static uint8_t *i2s_weights(int32_t n_in, int32_t n_out)
{
    const size_t n = (size_t)n_in * (size_t)n_out / 4;
    uint8_t *w = malloc(n);
    if (!w)
        return NULL;
    for (size_t i = 0; i < n; i++) {
        uint8_t b = 0;
        for (int k = 0; k < 4; k++)
            b = (uint8_t)(b << 2 | next_random() % 3);
        w[i] = b;
    }
    return w;
}

/* Q2_0 blocks: an F16 scale in [0.125, 0.5) and any codes, 3 (+2) included. */
static uint8_t *q2_0_weights(int32_t n_in, int32_t n_out)
{
    const size_t n_blocks = (size_t)n_out * (size_t)(n_in / 64), n = n_blocks * 18;
    uint8_t *w = malloc(n);
    if (!w)
        return NULL;
    for (size_t i = 0; i < n; i++)
        w[i] = (uint8_t)next_random();
    for (size_t b = 0; b < n_blocks; b++) {
        const uint16_t h = (uint16_t)(0x3000 + next_random() % 0x0800);
        memcpy(w + 18 * b, &h, sizeof h);
    }
    return w;
}

/* Q8_0 blocks: an F16 scale of either sign in [0.125, 0.5), some zero, and any int8 values,
 * -128 included. */
static uint8_t *q8_0_weights(int32_t n_in, int32_t n_out)
{
    const size_t n_blocks = (size_t)n_out * (size_t)(n_in / 32), n = n_blocks * 34;
    uint8_t *w = malloc(n);
    if (!w)
        return NULL;
    for (size_t i = 0; i < n; i++)
        w[i] = (uint8_t)next_random();
    for (size_t b = 0; b < n_blocks; b++) {
        const uint32_t r = next_random();
        const uint16_t h = r % 16 == 0 ? 0 : (uint16_t)((r & 0x8000u) | (0x3000 + r % 0x0800));
        memcpy(w + 34 * b, &h, sizeof h);
    }
    return w;
}

typedef struct {
    int32_t n_in, n_out, n_tok;
} shape;

enum { I2S, Q2_0, Q8_0 };
static const char *const FORMAT_NAMES[] = {"I2_S", "Q2_0", "Q8_0"};

/* One product on every set the CPU has and 1..3 threads against the scalar set. Returns the
 * number of differing results, or -1 when the product itself failed. */
static int check(int format, shape s, const char *const *sets, int n_sets)
{
    uint8_t *w = format == Q8_0   ? q8_0_weights(s.n_in, s.n_out)
                 : format == Q2_0 ? q2_0_weights(s.n_in, s.n_out)
                                  : i2s_weights(s.n_in, s.n_out);
    const size_t nx = (size_t)s.n_in * (size_t)s.n_tok, ny = (size_t)s.n_out * (size_t)s.n_tok;
    float *x = malloc(nx * sizeof *x), *want = malloc(ny * sizeof *want),
          *got = malloc(ny * sizeof *got);
    int bad = 0;
    if (!w || !x || !want || !got) {
        bad = -1;
        goto done;
    }
    fill_activations(x, nx);
    const float scale = 0.37f;
#define PRODUCT(kernel, out, threads)                                                              \
    (format == Q8_0 ? bn_q8_0_matmul(kernel, w, s.n_in, s.n_out, x, s.n_tok, out, threads)         \
     : format == Q2_0                                                                              \
         ? bn_q2_0_matmul(kernel, w, s.n_in, s.n_out, x, s.n_tok, out, threads)                    \
         : bn_ternary_matmul(kernel, w, scale, s.n_in, s.n_out, x, s.n_tok, out, threads))
    if (PRODUCT("scalar", want, 1) != 0) {
        bad = -1;
        goto done;
    }
    for (int k = 0; k < n_sets; k++)
        for (int32_t threads = 1; threads <= 3; threads++) {
            memset(got, 0xff, ny * sizeof *got);
            if (PRODUCT(sets[k], got, threads) != 0) {
                bad = -1;
                goto done;
            }
            if (memcmp(want, got, ny * sizeof *got) != 0) {
                printf("%s %s %dx%d, %d tokens, %d threads: differs from scalar\n",
                       FORMAT_NAMES[format], sets[k], s.n_out, s.n_in, s.n_tok, threads);
                bad++;
            }
        }
#undef PRODUCT
done:
    free(w);
    free(x);
    free(want);
    free(got);
    return bad;
}

int main(void)
{
    static const char *const all_sets[] = {"avx2", "avx512vnni", "amx"};
    const char *sets[3];
    int n_sets = 0;
    const char *chosen = bn_kernel_name(); /* selecting is how to ask; put it back after */
    for (size_t i = 0; i < sizeof all_sets / sizeof all_sets[0]; i++)
        if (bn_kernel_select(all_sets[i]) == 0)
            sets[n_sets++] = all_sets[i];
    bn_kernel_select(chosen);
    printf("kernel sets:");
    for (int i = 0; i < n_sets; i++)
        printf(" %s", sets[i]);
    printf("\n");

    /* (n_in, n_out, n_tok): decode (1..4 tokens), token groups with tails (5..17), prefill
     * tiles (12+ tokens, 16-token groups with tails), rows not multiples of 4 or 16, inputs
     * of a few blocks, a partial last chunk of 1024, several chunks */
    static const shape i2s_shapes[] = {{128, 5, 1},   {256, 33, 2},   {384, 17, 4},  {1024, 20, 5},
                                       {640, 47, 16}, {1152, 31, 33}, {2048, 18, 40}};
    /* ... and for Q2_0 also many rows (L2 row blocks), token groups split by the block-sum
     * buffer, and inputs past 2^19 (kept in the natural layout) */
    static const shape q2_0_shapes[] = {{64, 5, 1},
                                        {64 * 15, 33, 3},
                                        {1024, 16, 4},
                                        {1344, 23, 3},
                                        {1024 + 64 * 5, 47, 12},
                                        {64 * 3, 9, 15},
                                        {64 * 17, 18, 17},
                                        {2048 + 960, 31, 6},
                                        {1024, 1000, 6},
                                        {2048 + 64 * 7, 31, 33},
                                        {4096, 20, 40},
                                        {64 * 8193, 3, 2}};
    /* ... and for the Q8_0 head (float activations): single blocks, 4-row streams and
     * leftover rows, the AVX-512 set's 1-4 token tiles and their tails, a real head width */
    static const shape q8_0_shapes[] = {{32, 1, 1},       {64, 5, 2},   {96, 3, 3},    {160, 33, 4},
                                        {32 * 37, 17, 5}, {2560, 9, 9}, {3072, 100, 7}};
    static const struct {
        int format;
        const char *name;
        const shape *shapes;
        size_t n;
    } runs[] = {
        {I2S, "I2_S", i2s_shapes, sizeof i2s_shapes / sizeof i2s_shapes[0]},
        {Q2_0, "Q2_0", q2_0_shapes, sizeof q2_0_shapes / sizeof q2_0_shapes[0]},
        {Q8_0, "Q8_0", q8_0_shapes, sizeof q8_0_shapes / sizeof q8_0_shapes[0]},
    };
    int bad = 0;
    for (size_t k = 0; k < sizeof runs / sizeof runs[0]; k++)
        for (size_t i = 0; i < runs[k].n; i++) {
            const int r = check(runs[k].format, runs[k].shapes[i], sets, n_sets);
            if (r < 0) {
                printf("%s product failed\n", runs[k].name);
                return 2;
            }
            bad += r;
        }
    printf("%d differences\n", bad);
    return bad != 0;
}
