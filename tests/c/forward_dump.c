/* forward_dump.c - the engine end to end without Python, for other architectures (run under
 * qemu-user by tests/test_portability.py).
 *
 *   forward_dump MODEL OUT THREADS
 *
 * Loads MODEL, feeds tokens 3..42 into slot 0 (a prefill of 24 tokens, then one token per
 * call, so both paths run) with the logits of every token, and writes them to OUT as
 * little-endian float32 (40 x n_vocab). Then 8 greedy tokens through the sampler, printed on
 * one line with the kernel set's name. Exit status 0, or 1 with a message.
 */
#define _POSIX_C_SOURCE 200809L

#include "bitnet.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N_TOKENS = 40, PREFILL = 24 };

static int fail(const char *what, const char *err)
{
    fprintf(stderr, "forward_dump: %s: %s\n", what, err);
    return 1;
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return fail("usage", "forward_dump MODEL OUT THREADS");
    char err[512] = "";
    bn_model *m = bn_model_load(argv[1], err, sizeof err);
    if (!m)
        return fail("load", err);
    bn_hparams hp;
    bn_model_hparams(m, &hp);
    bn_context *ctx = bn_context_new(m, 1, 128, atoi(argv[3]), err, sizeof err);
    if (!ctx)
        return fail("context", err);
    FILE *out = fopen(argv[2], "wb");
    if (!out)
        return fail("open", argv[2]);

    int32_t tokens[N_TOKENS];
    for (int i = 0; i < N_TOKENS; i++)
        tokens[i] = 3 + i;
    int done = 0;
    while (done < N_TOKENS) {
        int n = done == 0 ? PREFILL : 1;
        bn_batch_entry e = {0, n, tokens + done, BN_LOGITS_ALL, NULL, 0};
        if (bn_forward(ctx, &e, 1, err, sizeof err) != 0)
            return fail("forward", err);
        for (int t = 0; t < n; t++) {
            const float *lg = bn_logits(ctx, 0, t);
            if (!lg || fwrite(lg, sizeof *lg, (size_t)hp.n_vocab, out) != (size_t)hp.n_vocab)
                return fail("logits", "missing or not written");
        }
        done += n;
    }
    if (fclose(out) != 0)
        return fail("close", argv[2]);

    bn_sampling sp = {0.0f, 0, 1.0f, 0.0f, 1.0f, -1, 0.0f, 0.0f, 42};
    bn_sampler *s = bn_sampler_new(&sp, hp.n_vocab);
    if (!s)
        return fail("sampler", "cannot create");
    printf("kernel %s greedy", bn_kernel_name());
    int32_t tok = tokens[N_TOKENS - 1];
    for (int i = 0; i < 8; i++) {
        const float *lg = bn_logits(ctx, 0, 0);
        tok = bn_sampler_sample(s, lg);
        bn_sampler_accept(s, tok);
        printf(" %d", (int)tok);
        bn_batch_entry e = {0, 1, &tok, BN_LOGITS_LAST, NULL, 0};
        if (bn_forward(ctx, &e, 1, err, sizeof err) != 0)
            return fail("decode", err);
    }
    printf("\n");
    bn_sampler_free(s);
    bn_context_free(ctx);
    bn_model_free(m);
    return 0;
}
