/* load_harness.c - drives the engine over many GGUF files for the sanitizer run.
 *
 *   load_harness FILE...                       load each file, print one line per file
 *   load_harness --fuzz SEED COUNT MS BASE WORK [HEADER_BYTES [INFOS_START]]
 *       COUNT seeded mutations of BASE (stops after MS milliseconds), each written to WORK
 *       and loaded; prints a summary line. Three mutations in four land in the first
 *       HEADER_BYTES bytes (default: an eighth of the file), where the parsing happens, half
 *       of those in the tensor infos [INFOS_START, HEADER_BYTES).
 *   load_harness --q2-kernels
 *       every SIMD kernel set this CPU has against the scalar one on Q2_0 products of many
 *       shapes (bn_q2_0_matmul); prints "Q2_0 NAME CASES" per set run.
 *
 * On a successful load every metadata value is read through bn_meta_* (every string of every
 * string array included) and, when built with -DHARNESS_FORWARD (forward.c present), a few
 * tokens go through bn_forward and, with -DHARNESS_SAMPLER, a token is sampled. A failed load
 * must come with a non-empty message. Exit status 0 unless the engine broke a rule
 * (the sanitizers abort on their own).
 */
#define _POSIX_C_SOURCE 200809L

#include "bitnet.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <fcntl.h>
#include <unistd.h>

static int g_broken = 0;  /* set when the engine breaks its contract (not a sanitizer error) */
static int g_threads = 2; /* worker threads per context (1 while fuzzing: thousands of contexts) */

static void broken(const char *path, const char *what)
{
    fprintf(stderr, "CONTRACT %s: %s\n", path, what);
    g_broken = 1;
}

/* Reads every metadata value; returns a checksum so the reads cannot be optimised away. */
static uint64_t read_all_metadata(const char *path, const bn_model *m)
{
    uint64_t sum = 0;
    int64_t n = bn_meta_count(m);
    for (int64_t i = 0; i < n; i++) {
        size_t klen = 0;
        const char *key = bn_meta_key(m, i, &klen);
        if (!key || klen == 0) {
            broken(path, "bn_meta_key returned nothing for a valid index");
            continue;
        }
        char kbuf[256];
        size_t kl = klen < sizeof kbuf - 1 ? klen : sizeof kbuf - 1;
        memcpy(kbuf, key, kl);
        kbuf[kl] = '\0';
        if (kl == klen && !memchr(key, '\0', klen) && bn_meta_find(m, kbuf) != i)
            broken(path, "bn_meta_find does not find a key by its own name");
        for (size_t j = 0; j < klen; j++)
            sum += (unsigned char)key[j];
        int t = bn_meta_type(m, i);
        int64_t iv;
        double fv;
        size_t len;
        const char *s;
        switch (t) {
        case BN_GGUF_U8:
        case BN_GGUF_I8:
        case BN_GGUF_U16:
        case BN_GGUF_I16:
        case BN_GGUF_U32:
        case BN_GGUF_I32:
        case BN_GGUF_BOOL:
        case BN_GGUF_I64:
            if (bn_meta_get_i64(m, i, &iv) != 0)
                broken(path, "integer key not readable");
            else
                sum += (uint64_t)iv;
            break;
        case BN_GGUF_U64:
            if (bn_meta_get_i64(m, i, &iv) == 0)
                sum += (uint64_t)iv;
            break;
        case BN_GGUF_F32:
        case BN_GGUF_F64:
            if (bn_meta_get_f64(m, i, &fv) != 0)
                broken(path, "float key not readable");
            else
                sum += (uint64_t)(fv == fv && fv > -1e18 && fv < 1e18 ? (int64_t)fv : 7);
            break;
        case BN_GGUF_STRING:
            s = bn_meta_get_str(m, i, &len);
            if (!s)
                broken(path, "string key not readable");
            else
                for (size_t j = 0; j < len; j++)
                    sum += (unsigned char)s[j];
            break;
        case BN_GGUF_ARRAY: {
            int et;
            uint64_t count;
            const void *data;
            if (bn_meta_array(m, i, &et, &count, &data) != 0) {
                broken(path, "array key not readable");
                break;
            }
            if (et == BN_GGUF_STRING) {
                for (uint64_t j = 0; j < count; j++) {
                    s = bn_meta_array_str(m, i, j, &len);
                    if (!s) {
                        broken(path, "string array element not readable");
                        break;
                    }
                    for (size_t k = 0; k < len; k++)
                        sum += (unsigned char)s[k];
                }
                if (bn_meta_array_str(m, i, count, &len) != NULL)
                    broken(path, "bn_meta_array_str accepted an index past the end");
            } else {
                static const size_t sizes[] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
                size_t es = et >= 0 && et <= 12 ? sizes[et] : 0;
                const unsigned char *p = data;
                if (es)
                    for (uint64_t j = 0; j < count * es; j++)
                        sum += p[j];
                else if (et == BN_GGUF_ARRAY && count > 0)
                    sum += p[0]; /* nested arrays: the pointer must be valid at least */
            }
            break;
        }
        default: broken(path, "unknown metadata type reported");
        }
    }
    if (bn_meta_type(m, n) != -1 || bn_meta_key(m, -1, NULL) != NULL)
        broken(path, "bad index accepted");
    return sum;
}

#ifdef HARNESS_FORWARD
/* Two slots: a 3-token prefill then one decode step each, logits read in full. */
static uint64_t run_forward(const char *path, const bn_model *m, const bn_hparams *hp)
{
    char err[512];
    uint64_t sum = 0;
    bn_context *ctx = bn_context_new(m, 2, 16, g_threads, err, sizeof err);
    if (!ctx) {
        fprintf(stderr, "context failed for %s: %s\n", path, err);
        broken(path, "bn_context_new failed on a loaded model");
        return 0;
    }
    int32_t toks_a[3] = {1 % hp->n_vocab, 2 % hp->n_vocab, (hp->n_vocab - 1)};
    int32_t toks_b[3] = {0, 5 % hp->n_vocab, 7 % hp->n_vocab};
    bn_batch_entry e[2] = {
        {.slot = 0, .n_tokens = 3, .tokens = toks_a, .logits = BN_LOGITS_ALL},
        {.slot = 1, .n_tokens = 3, .tokens = toks_b, .logits = BN_LOGITS_LAST},
    };
    for (int step = 0; step < 2; step++) {
        if (bn_forward(ctx, e, 2, err, sizeof err) != 0) {
            fprintf(stderr, "forward failed for %s: %s\n", path, err);
            broken(path, "bn_forward failed on valid input");
            break;
        }
        for (int32_t t = 0; t < e[0].n_tokens; t++) {
            const float *lg = bn_logits(ctx, 0, t);
            if (!lg)
                broken(path, "bn_logits NULL for a computed token");
            else
                for (int32_t v = 0; v < hp->n_vocab; v++)
                    sum += lg[v] > 0.0f;
        }
        const float *last = bn_logits(ctx, 1, e[1].n_tokens - 1);
        if (!last) {
            broken(path, "bn_logits NULL for the last token");
            break;
        }
#ifdef HARNESS_SAMPLER
        bn_sampling sp = {.temperature = 0.8f,
                          .top_k = 40,
                          .top_p = 0.95f,
                          .min_p = 0.05f,
                          .repeat_penalty = 1.1f,
                          .repeat_last_n = 64,
                          .seed = 42};
        bn_sampler *s = bn_sampler_new(&sp, hp->n_vocab);
        if (s) {
            bn_sampler_accept(s, toks_b[0]);
            int32_t tok = bn_sampler_sample(s, last);
            /* -1 is the documented answer when no logit is usable (all NaN or -inf). */
            int any_usable = 0;
            for (int32_t v = 0; v < hp->n_vocab; v++)
                any_usable |= last[v] > -INFINITY;
            if (tok < -1 || tok >= hp->n_vocab || (tok == -1 && any_usable))
                broken(path, "sampled token out of range");
            sum += (uint64_t)tok;
            /* The reporting entry on a fresh sampler of the same seed: the same token, and a
             * distribution (best first, summing to at most 1) that holds it. */
            bn_sampler *s2 = bn_sampler_new(&sp, hp->n_vocab);
            if (s2) {
                int32_t ids[8], n_top = -1;
                float probs[8], prob = -1.0f;
                bn_sampler_accept(s2, toks_b[0]);
                int32_t tok2 =
                    bn_sampler_sample_probs(s2, last, NULL, 0, 8, ids, probs, &prob, &n_top);
                double total = 0.0;
                for (int32_t i = 0; i < n_top && i < 8; i++)
                    total += probs[i];
                if (tok2 != tok || (tok >= 0 && (!(prob > 0.0f && prob <= 1.0f) || n_top < 1 ||
                                                 n_top > 8 || total > 1.0 + 1e-5)))
                    broken(path, "bn_sampler_sample_probs disagrees with bn_sampler_sample");
                bn_sampler_free(s2);
            }
            bn_sampler_free(s);
        }
#endif
        if (bn_logits(ctx, 2, 0) || bn_logits(ctx, -1, 0) || bn_logits(ctx, 0, e[0].n_tokens) ||
            bn_logits(ctx, 0, -1) || (e[1].n_tokens > 1 && bn_logits(ctx, 1, 0)))
            broken(path, "bn_logits answered an index that has no logits");
        /* The decode step on a new pool (the old one joined and freed under the sanitizers);
         * not while fuzzing, where thousands of contexts come and go anyway. */
        if (step == 0 && g_threads > 1 && bn_context_set_threads(ctx, g_threads + 1) != 0)
            broken(path, "bn_context_set_threads failed");
        /* Decode step: one token per slot. */
        e[0].n_tokens = 1;
        e[0].logits = BN_LOGITS_LAST;
        e[1].n_tokens = 1;
    }
    /* Hidden-state entries (model-format §5.3.1): y rows instead of logits. */
    e[0].n_tokens = 2;
    e[0].logits = BN_HIDDEN_ALL;
    e[1].n_tokens = 2;
    e[1].logits = BN_HIDDEN_LAST;
    if (bn_forward(ctx, e, 2, err, sizeof err) == 0) {
        for (int32_t t = 0; t < 2; t++) {
            const float *h = bn_hidden(ctx, 0, t);
            if (!h)
                broken(path, "bn_hidden NULL for a computed token");
            else
                for (int32_t i = 0; i < hp->n_embd; i++)
                    sum += h[i] > 0.0f;
        }
        if (!bn_hidden(ctx, 1, 1) || bn_hidden(ctx, 1, 0) || bn_hidden(ctx, 0, 2) ||
            bn_logits(ctx, 0, 0) || bn_logits(ctx, 1, 1))
            broken(path, "bn_hidden / bn_logits answered wrongly for hidden entries");
    }
    bn_context_free(ctx);
    return sum;
}
#endif

/* 0 = loaded, 1 = rejected with a message. */
static int check_file(const char *path, int verbose)
{
    char err[1024];
    memset(err, 0, sizeof err);
    bn_model *m = bn_model_load(path, err, sizeof err);
    if (!m) {
        if (err[0] == '\0')
            broken(path, "load failed without a message");
        if (!memchr(err, '\0', sizeof err))
            broken(path, "error message not terminated");
        if (verbose)
            printf("ERR %s: %s\n", path, err);
        return 1;
    }
    bn_hparams hp;
    bn_model_hparams(m, &hp);
    uint64_t sum = read_all_metadata(path, m);
#ifdef HARNESS_FORWARD
    sum += run_forward(path, m, &hp);
#endif
    if (verbose)
        printf("OK %s: %s vocab=%d embd=%d layers=%d kv=%lld sum=%llu\n", path, hp.architecture,
               hp.n_vocab, hp.n_embd, hp.n_layer, (long long)bn_meta_count(m),
               (unsigned long long)sum);
    bn_model_free(m);
    return 0;
}

/* ---- fuzzing ---- */

static uint64_t rng_state;

static uint64_t rng(void)
{ /* xorshift64* */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Interesting values for 4- and 8-byte fields. */
static uint64_t interesting(void)
{
    /* clang-format off: a table, kept in rows */
    static const uint64_t v[] = {0,
                                 1,
                                 2,
                                 3,
                                 4,
                                 7,
                                 8,
                                 9,
                                 12,
                                 13,
                                 31,
                                 32,
                                 33,
                                 36,
                                 64,
                                 127,
                                 128,
                                 255,
                                 256,
                                 0x7fff,
                                 0xffff,
                                 0x7fffffff,
                                 0x80000000,
                                 0xffffffff,
                                 0x100000000ull,
                                 0x7fffffffffffffffull,
                                 0x8000000000000000ull,
                                 0xffffffffffffffffull,
                                 0xfffffffffffffff0ull};
    /* clang-format on */
    return v[rng() % (sizeof v / sizeof v[0])];
}

/* Overwrite in place, then cut to length: truncating to zero first would make ext4 flush the
 * file on every close (its replace-via-truncate heuristic) and the loop would wait on disk. */
static int write_file(const char *path, const unsigned char *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT, 0600);
    if (fd < 0)
        return -1;
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, buf + done, len - done);
        if (n <= 0) {
            close(fd);
            return -1;
        }
        done += (size_t)n;
    }
    int rc = ftruncate(fd, (off_t)len);
    return close(fd) != 0 ? -1 : rc;
}

static int fuzz(uint64_t seed, long count, double budget_ms, const char *base, const char *work,
                size_t head, size_t infos)
{
    FILE *f = fopen(base, "rb");
    if (!f) {
        perror(base);
        return 2;
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *orig = malloc((size_t)size), *buf = malloc((size_t)size);
    if (!orig || !buf || fread(orig, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "cannot read %s\n", base);
        return 2;
    }
    fclose(f);
    if (head == 0 || head > (size_t)size)
        head = (size_t)size / 8 + 1;
    if (infos >= head)
        infos = 0;
    rng_state = seed * 0x9E3779B97F4A7C15ull + 1;
    double t0 = now_ms();
    long done = 0, loaded = 0;
    for (long it = 0; it < count && now_ms() - t0 < budget_ms; it++, done++) {
        memcpy(buf, orig, (size_t)size);
        size_t len = (size_t)size;
        int n_mut = 1 + (int)(rng() % 4);
        for (int k = 0; k < n_mut; k++) {
            size_t pos;
            switch (rng() % 8) {
            case 0:
            case 1: pos = rng() % len; break;
            case 2:
            case 3:
            case 4: pos = infos + rng() % (head - infos); break;
            default: pos = rng() % head;
            }
            switch (rng() % 6) {
            case 0: buf[pos] = (unsigned char)rng(); break;                /* random byte */
            case 1: buf[pos] ^= (unsigned char)(1u << (rng() % 8)); break; /* bit flip */
            case 2: {                                                      /* 8-byte field */
                uint64_t v = interesting();
                size_t n = len - pos < 8 ? len - pos : 8;
                memcpy(buf + pos, &v, n);
                break;
            }
            case 3: { /* 4-byte field */
                uint32_t v = (uint32_t)interesting();
                size_t n = len - pos < 4 ? len - pos : 4;
                memcpy(buf + pos, &v, n);
                break;
            }
            case 4:
                if (k == n_mut - 1)
                    len = pos;
                break; /* truncation */
            default: { /* copy a chunk */
                size_t from = rng() % len, n = 1 + rng() % 16;
                if (from + n > len)
                    n = len - from;
                if (pos + n > len)
                    n = len - pos;
                memmove(buf + pos, buf + from, n);
            }
            }
        }
        if (write_file(work, buf, len) != 0) {
            perror(work);
            return 2;
        }
        int was_broken = g_broken;
        if (check_file(work, 0) == 0)
            loaded++;
        if (g_broken && !was_broken) { /* keep the first offending file for a look */
            char keep[4096];
            snprintf(keep, sizeof keep, "%s.broken", work);
            write_file(keep, buf, len);
            fprintf(stderr, "mutation %ld broke the contract: kept as %s\n", it, keep);
        }
    }
    printf("FUZZ %ld mutations, %ld loaded, %ld rejected, %.0f ms\n", done, loaded, done - loaded,
           now_ms() - t0);
    free(orig);
    free(buf);
    return 0;
}

#ifdef HARNESS_FORWARD
/* Q2_0 products (model-format §10.6.2) from every SIMD kernel set against the scalar one, bit
 * for bit, over shapes that reach each path of the SIMD kernels: a partial chunk of 16 blocks
 * alone and after full ones, 4-row streams and leftover rows, 1 to 4 tokens, more tokens over
 * several L2 row blocks, token groups split by the block-sum buffer, inputs past 2^19 (natural
 * layout), 1 to 3 threads. The weights are allocated at their exact size, so that reading past
 * the matrix is caught. */
static int q2_kernels(void)
{
    static const int32_t shapes[][3] = {{64, 3, 1},     {1024, 9, 1},        {1344, 23, 3},
                                        {4096, 70, 4},  {2048 + 960, 31, 6}, {1024, 1000, 6},
                                        {40960, 6, 20}, {64 * 8193, 3, 2}};
    static const char *const names[] = {"avx2", "avx512vnni", "amx"};
    int cases[3] = {0, 0, 0};
    rng_state = 20261201;
    for (size_t c = 0; c < sizeof shapes / sizeof shapes[0]; c++) {
        const int32_t n_in = shapes[c][0], n_out = shapes[c][1], n_tok = shapes[c][2];
        const size_t nb = (size_t)n_out * (size_t)(n_in / 64);
        uint8_t *w = malloc(nb * 18);
        float *x = malloc(sizeof *x * (size_t)n_in * (size_t)n_tok);
        float *want = malloc(sizeof *want * (size_t)n_out * (size_t)n_tok);
        float *got = malloc(sizeof *got * (size_t)n_out * (size_t)n_tok);
        if (!w || !x || !want || !got) {
            fprintf(stderr, "out of memory\n");
            return 1;
        }
        for (size_t i = 0; i < nb * 18; i++)
            w[i] = (uint8_t)rng();
        for (size_t b = 0; b < nb; b++)
            w[b * 18 + 1] &= 0x3F; /* finite F16 scales (either sign) */
        for (size_t i = 0; i < (size_t)n_in * (size_t)n_tok; i++)
            x[i] = (float)((int64_t)(rng() % 20001) - 10000) / 1000.0f;
        if (bn_q2_0_matmul("scalar", w, n_in, n_out, x, n_tok, want, 1) != 0)
            broken("q2-kernels", "the scalar Q2_0 product failed");
        for (int k = 0; k < 3; k++)
            for (int32_t threads = 1; threads <= 3; threads++) {
                if (bn_q2_0_matmul(names[k], w, n_in, n_out, x, n_tok, got, threads) != 0)
                    break; /* a set this CPU lacks */
                if (memcmp(want, got, sizeof *got * (size_t)n_out * (size_t)n_tok) != 0) {
                    fprintf(stderr,
                            "CONTRACT q2-kernels: %s differs from scalar at %dx%d, %d "
                            "tokens, %d threads\n",
                            names[k], (int)n_in, (int)n_out, (int)n_tok, (int)threads);
                    g_broken = 1;
                }
                cases[k]++;
            }
        free(got);
        free(want);
        free(x);
        free(w);
    }
    for (int k = 0; k < 3; k++)
        if (cases[k])
            printf("Q2_0 %s %d\n", names[k], cases[k]);
    return g_broken;
}
#endif

int main(int argc, char **argv)
{
#ifdef HARNESS_FORWARD
    if (argc == 2 && strcmp(argv[1], "--q2-kernels") == 0)
        return q2_kernels();
#endif
    if (argc >= 7 && strcmp(argv[1], "--fuzz") == 0) {
        g_threads = 1;
        size_t head = argc >= 8 ? (size_t)strtoull(argv[7], NULL, 10) : 0;
        size_t infos = argc >= 9 ? (size_t)strtoull(argv[8], NULL, 10) : 0;
        int rc = fuzz(strtoull(argv[2], NULL, 10), strtol(argv[3], NULL, 10), strtod(argv[4], NULL),
                      argv[5], argv[6], head, infos);
        return rc ? rc : g_broken;
    }
    if (argc < 2) {
        fprintf(stderr,
                "usage: %s FILE... | --fuzz SEED COUNT MS BASE WORK [HEADER_BYTES [INFOS_START]] "
                "| --q2-kernels\n",
                argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++)
        check_file(argv[i], 1);
    return g_broken;
}
