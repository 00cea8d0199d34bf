/* context.c - contexts: lifetime, sequence slots with their KV caches, cancel flags, and
 * bn_forward's batch validation and chunking around the arithmetic of forward.c.
 *
 * Everything is allocated in bn_context_new; bn_forward only grows the logits buffer when a
 * call asks for more logits rows than ever before (before any state changes).
 */
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bitnet.h"
#include "context.h"
#include "error.h"

struct bn_cancel {
    atomic_int flag;
};

bn_cancel *bn_cancel_new(void)
{
    bn_cancel *c = malloc(sizeof *c);
    if (c)
        atomic_init(&c->flag, 0);
    return c;
}

void bn_cancel_free(bn_cancel *c)
{
    free(c);
}

void bn_cancel_set(bn_cancel *c)
{
    if (c)
        atomic_store_explicit(&c->flag, 1, memory_order_release);
}

void bn_cancel_clear(bn_cancel *c)
{
    if (c)
        atomic_store_explicit(&c->flag, 0, memory_order_release);
}

int bn_cancel_is_set(const bn_cancel *c)
{
    return c ? atomic_load_explicit(&((bn_cancel *)c)->flag, memory_order_acquire) : 0;
}

static void *alloc_array(size_t n, size_t size, int *failed)
{
    if (n == 0)
        n = 1;
    if (n > SIZE_MAX / size) {
        *failed = 1;
        return NULL;
    }
    void *p = malloc(n * size); /* large blocks come zeroed from mmap and stay untouched */
    if (!p)
        *failed = 1;
    return p;
}

void bn_context_free(bn_context *ctx)
{
    if (!ctx)
        return;
    bn_pool_free(ctx->pool);
    free(ctx->kcache);
    free(ctx->vcache);
    free(ctx->pos);
    free(ctx->rope_cos);
    free(ctx->rope_sin);
    free(ctx->x);
    free(ctx->h);
    free(ctx->h_in);
    free(ctx->q);
    free(ctx->k);
    free(ctx->v);
    free(ctx->att);
    free(ctx->g);
    free(ctx->u);
    free(ctx->tmp);
    free(ctx->ynorm);
    free(ctx->qa);
    free(ctx->qa_tiles);
    free(ctx->qa_s);
    free(ctx->qa_sum);
    free(ctx->tok_slot);
    free(ctx->tok_pos);
    free(ctx->tok_id);
    free(ctx->tok_row);
    free(ctx->tok_hrow);
    free(ctx->scores);
    free(ctx->logits);
    free(ctx->hidden);
    free(ctx->ents);
    free(ctx->slot_seen);
    free(ctx);
}

static int check_matrix(const bn_ternary *w, int32_t n_in, int32_t n_out, const char *what,
                        int32_t layer, char *err, size_t errlen)
{
    if (!w->codes || w->n_in != n_in || w->n_out != n_out ||
        n_in % (w->fmt == BN_WFMT_Q2_0 ? 64 : 128) != 0) {
        bn_set_err(err, errlen, "layer %d %s: shape %d x %d, expected %d x %d", layer, what,
                   w->n_out, w->n_in, n_out, n_in);
        return -1;
    }
    return 0;
}

bn_context *bn_context_new(const bn_model *m, int32_t n_slots, int32_t n_ctx, int32_t n_threads,
                           char *err, size_t errlen)
{
    if (!m) {
        bn_set_err(err, errlen, "no model");
        return NULL;
    }
    const bn_hparams *hp = &m->hp;
    if (n_ctx <= 0)
        n_ctx = hp->n_ctx_train;
    if (n_slots < 1 || n_slots > 4096) {
        bn_set_err(err, errlen, "n_slots %d out of range 1..4096", n_slots);
        return NULL;
    }
    if (n_ctx < 1 || n_ctx > (1 << 20)) {
        bn_set_err(err, errlen, "n_ctx %d out of range 1..%d", n_ctx, 1 << 20);
        return NULL;
    }
    if (n_threads < 1 || n_threads > BN_POOL_MAX_THREADS) {
        bn_set_err(err, errlen, "n_threads %d out of range 1..%d", n_threads, BN_POOL_MAX_THREADS);
        return NULL;
    }
    const int32_t E = hp->n_embd, F = hp->n_ff, H = hp->n_head, Hkv = hp->n_head_kv,
                  D = hp->head_dim;
    /* q_dim = H * D is E for BitNet; other graphs may differ (model-format §10.1.4) */
    if (E <= 0 || E % 128 != 0 || F <= 0 || F % 128 != 0 || H <= 0 || Hkv <= 0 || H % Hkv != 0 ||
        H / Hkv > 64 || D <= 0 || D % 2 != 0 || D > 4096 || (int64_t)D * H % 128 != 0 ||
        (int64_t)D * H > (1 << 20) || hp->n_layer <= 0 || hp->n_vocab <= 0 || E > (1 << 20) ||
        F > (1 << 22) || !m->arch) {
        bn_set_err(err, errlen,
                   "unsupported model dimensions (n_embd %d, n_ff %d, n_head %d, "
                   "n_head_kv %d, head_dim %d)",
                   E, F, H, Hkv, D);
        return NULL;
    }
    if ((!m->tok_embd && !m->tok_embd_q2.codes && !m->tok_embd_q8) ||
        (!m->head && !m->head_q2.codes && !m->head_q8) || !m->output_norm || !m->layers) {
        bn_set_err(err, errlen, "model is missing tensors");
        return NULL;
    }
    for (int32_t l = 0; l < hp->n_layer; l++) {
        const bn_layer *L = &m->layers[l];
        if (check_matrix(&L->wq, E, H * D, "attn_q", l, err, errlen) ||
            check_matrix(&L->wk, E, Hkv * D, "attn_k", l, err, errlen) ||
            check_matrix(&L->wv, E, Hkv * D, "attn_v", l, err, errlen) ||
            check_matrix(&L->wo, H * D, E, "attn_output", l, err, errlen) ||
            check_matrix(&L->w_gate, E, F, "ffn_gate", l, err, errlen) ||
            check_matrix(&L->w_up, E, F, "ffn_up", l, err, errlen) ||
            check_matrix(&L->w_down, F, E, "ffn_down", l, err, errlen))
            return NULL;
        if (!L->attn_norm || !L->ffn_norm ||
            (m->arch->sub_norms && (!L->attn_sub_norm || !L->ffn_sub_norm)) ||
            (m->arch->qk_norm && (!L->attn_q_norm || !L->attn_k_norm)) ||
            (m->arch->proj_in_norms && (!L->q_in || !L->k_in || !L->v_in || !L->o_in ||
                                        !L->gate_in || !L->up_in || !L->down_in))) {
            bn_set_err(err, errlen, "layer %d: missing norm weights", l);
            return NULL;
        }
    }

    bn_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) {
        bn_set_err(err, errlen, "out of memory");
        return NULL;
    }
    ctx->m = m;
    ctx->hp = *hp;
    ctx->n_slots = n_slots;
    ctx->n_ctx = n_ctx;
    ctx->kv_dim = Hkv * D;
    ctx->q_dim = H * D;
    ctx->n_wide = E > F ? E : F;
    if (ctx->q_dim > ctx->n_wide)
        ctx->n_wide = ctx->q_dim;
    int64_t total_positions = (int64_t)n_slots * n_ctx;
    ctx->max_chunk = total_positions < BN_MAX_CHUNK ? (int32_t)total_positions : BN_MAX_CHUNK;

    int failed = 0;
    const size_t T = (size_t)ctx->max_chunk;
    const size_t cache_n = (size_t)n_slots * (size_t)hp->n_layer * (size_t)n_ctx;
    if (cache_n > SIZE_MAX / (size_t)ctx->kv_dim)
        failed = 1;
    else {
        ctx->kcache = alloc_array(cache_n * (size_t)ctx->kv_dim, sizeof(float), &failed);
        ctx->vcache = alloc_array(cache_n * (size_t)ctx->kv_dim, sizeof(float), &failed);
    }
    ctx->pos = calloc((size_t)n_slots, sizeof *ctx->pos);
    if (!ctx->pos)
        failed = 1;
    ctx->rope_cos = alloc_array((size_t)n_ctx * (size_t)(D / 2), sizeof(float), &failed);
    ctx->rope_sin = alloc_array((size_t)n_ctx * (size_t)(D / 2), sizeof(float), &failed);
    ctx->x = alloc_array(T * (size_t)E, sizeof(float), &failed);
    ctx->h = alloc_array(T * (size_t)ctx->n_wide, sizeof(float), &failed);
    if (m->arch->proj_in_norms)
        ctx->h_in = alloc_array(T * (size_t)ctx->n_wide, sizeof(float), &failed);
    ctx->q = alloc_array(T * (size_t)ctx->q_dim, sizeof(float), &failed);
    ctx->k = alloc_array(T * (size_t)ctx->kv_dim, sizeof(float), &failed);
    ctx->v = alloc_array(T * (size_t)ctx->kv_dim, sizeof(float), &failed);
    ctx->att = alloc_array(T * (size_t)ctx->q_dim, sizeof(float), &failed);
    ctx->g = alloc_array(T * (size_t)F, sizeof(float), &failed);
    ctx->u = alloc_array(T * (size_t)F, sizeof(float), &failed);
    ctx->tmp = alloc_array(T * (size_t)E, sizeof(float), &failed);
    ctx->ynorm = alloc_array(T * (size_t)E, sizeof(float), &failed);
    ctx->qa = alloc_array(T * (size_t)ctx->n_wide, 1, &failed);
    ctx->qa_tiles = alloc_array(T * (size_t)ctx->n_wide, 1, &failed);
    ctx->qa_s = alloc_array(T, sizeof(float), &failed);
    ctx->qa_sum = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_slot = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_pos = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_id = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_row = alloc_array(T, sizeof(int32_t), &failed);
    ctx->tok_hrow = alloc_array(T, sizeof(int32_t), &failed);
    ctx->scores_per_thread = (size_t)(H / Hkv) * (size_t)n_ctx;
    ctx->scores = alloc_array((size_t)n_threads * ctx->scores_per_thread, sizeof(float), &failed);
    ctx->logits_cap = n_slots;
    ctx->logits = alloc_array((size_t)n_slots * (size_t)hp->n_vocab, sizeof(float), &failed);
    ctx->hidden_cap = n_slots;
    ctx->hidden = alloc_array((size_t)n_slots * (size_t)E, sizeof(float), &failed);
    ctx->ents = alloc_array((size_t)n_slots, sizeof(entry_state), &failed);
    ctx->slot_seen = calloc((size_t)n_slots, sizeof(int32_t));
    if (!ctx->slot_seen)
        failed = 1;
    if (failed) {
        bn_set_err(err, errlen, "out of memory allocating a context of %d slots x %d positions",
                   n_slots, n_ctx);
        bn_context_free(ctx);
        return NULL;
    }
    ctx->pool = bn_pool_new(n_threads);
    if (!ctx->pool) {
        bn_set_err(err, errlen, "cannot start %d threads", n_threads);
        bn_context_free(ctx);
        return NULL;
    }
    /* RoPE angles of every position, once (model-format §5.2.3) */
    for (int32_t p = 0; p < n_ctx; p++)
        bn_rope_angles(p, D, hp->rope_base, &hp->rope_scaling, ctx->rope_cos + (size_t)p * (D / 2),
                       ctx->rope_sin + (size_t)p * (D / 2));
    return ctx;
}

int bn_context_set_threads(bn_context *ctx, int32_t n_threads)
{
    if (!ctx || n_threads < 1 || n_threads > BN_POOL_MAX_THREADS)
        return -1;
    if (n_threads == bn_pool_threads(ctx->pool))
        return 0;
    int failed = 0;
    float *scores = alloc_array((size_t)n_threads * ctx->scores_per_thread, sizeof(float), &failed);
    if (failed)
        return -1;
    bn_pool *pool = bn_pool_new(n_threads);
    if (!pool) {
        free(scores);
        return -1;
    }
    bn_pool_free(ctx->pool);
    free(ctx->scores);
    ctx->pool = pool;
    ctx->scores = scores;
    return 0;
}

int32_t bn_context_n_ctx(const bn_context *ctx)
{
    return ctx ? ctx->n_ctx : 0;
}

int32_t bn_context_n_slots(const bn_context *ctx)
{
    return ctx ? ctx->n_slots : 0;
}

void bn_seq_reset(bn_context *ctx, int32_t slot)
{
    if (ctx && slot >= 0 && slot < ctx->n_slots)
        ctx->pos[slot] = 0;
}

int bn_seq_truncate(bn_context *ctx, int32_t slot, int32_t pos)
{
    if (!ctx || slot < 0 || slot >= ctx->n_slots || pos < 0 || pos > ctx->pos[slot])
        return -1;
    ctx->pos[slot] = pos;
    return 0;
}

int32_t bn_seq_pos(const bn_context *ctx, int32_t slot)
{
    if (!ctx || slot < 0 || slot >= ctx->n_slots)
        return -1;
    return ctx->pos[slot];
}

/* ------------------------------------------------------------------ bn_forward */

/* 0, or -1 - e when entry e is at fault, or 1 when the call as a whole is (no entry is). */
static int validate(bn_context *ctx, const bn_batch_entry *entries, int32_t n_entries,
                    int64_t *n_rows, int64_t *n_hrows, char *err, size_t errlen)
{
    if (n_entries < 0 || (n_entries > 0 && !entries)) {
        bn_set_err(err, errlen, "bad entry list (%d entries)", n_entries);
        return 1;
    }
    if (n_entries > ctx->n_slots) {
        bn_set_err(err, errlen, "%d entries for %d slots: slots must be distinct", n_entries,
                   ctx->n_slots);
        return 1;
    }
    /* a new stamp per call; start over before the int32 would overflow (signed: UB) */
    if (ctx->stamp == INT32_MAX) {
        memset(ctx->slot_seen, 0, (size_t)ctx->n_slots * sizeof(int32_t));
        ctx->stamp = 0;
    }
    ctx->stamp++;
    int64_t rows = 0, hrows = 0;
    for (int32_t e = 0; e < n_entries; e++) {
        const bn_batch_entry *be = &entries[e];
        if (be->slot < 0 || be->slot >= ctx->n_slots) {
            bn_set_err(err, errlen, "entry %d: slot %d out of range 0..%d", e, be->slot,
                       ctx->n_slots - 1);
            return -1 - e;
        }
        if (ctx->slot_seen[be->slot] == ctx->stamp) {
            bn_set_err(err, errlen, "entry %d: slot %d appears twice in one batch", e, be->slot);
            return -1 - e;
        }
        ctx->slot_seen[be->slot] = ctx->stamp;
        if (be->n_tokens < 0 || (be->n_tokens > 0 && !be->tokens)) {
            bn_set_err(err, errlen, "entry %d (slot %d): bad token list (%d tokens)", e, be->slot,
                       be->n_tokens);
            return -1 - e;
        }
        if (be->logits < BN_LOGITS_NONE || be->logits > BN_HIDDEN_ALL) {
            bn_set_err(err, errlen, "entry %d (slot %d): bad logits mode %d", e, be->slot,
                       be->logits);
            return -1 - e;
        }
        for (int32_t t = 0; t < be->n_tokens; t++)
            if (be->tokens[t] < 0 || be->tokens[t] >= ctx->hp.n_vocab) {
                bn_set_err(err, errlen,
                           "entry %d (slot %d): token %d at index %d out of range "
                           "0..%d",
                           e, be->slot, be->tokens[t], t, ctx->hp.n_vocab - 1);
                return -1 - e;
            }
        const int32_t pos = ctx->pos[be->slot];
        if ((int64_t)pos + be->n_tokens > ctx->n_ctx) {
            bn_set_err(err, errlen,
                       "entry %d (slot %d): %d tokens at position %d exceed the "
                       "context size %d",
                       e, be->slot, be->n_tokens, pos, ctx->n_ctx);
            return -1 - e;
        }
        if (be->n_tokens > 0) {
            rows +=
                be->logits == BN_LOGITS_ALL ? be->n_tokens : (be->logits == BN_LOGITS_LAST ? 1 : 0);
            hrows +=
                be->logits == BN_HIDDEN_ALL ? be->n_tokens : (be->logits == BN_HIDDEN_LAST ? 1 : 0);
        }
    }
    *n_rows = rows;
    *n_hrows = hrows;
    return 0;
}

static int entry_cancelled(const bn_batch_entry *be)
{
    return be->cancel && bn_cancel_is_set(be->cancel);
}

/* Make *buf hold at least n rows of `width` floats (before any state changes); 0 or -1. */
static int grow_rows(float **buf, int64_t *cap, int64_t n, int32_t width)
{
    if (n <= *cap)
        return 0;
    const size_t w = (size_t)width;
    float *grown = (size_t)n > SIZE_MAX / sizeof(float) / w
                       ? NULL
                       : realloc(*buf, (size_t)n * w * sizeof(float));
    if (!grown)
        return -1;
    *buf = grown;
    *cap = n;
    return 0;
}

int bn_forward(bn_context *ctx, bn_batch_entry *entries, int32_t n_entries, char *err,
               size_t errlen)
{
    if (!ctx) {
        bn_set_err(err, errlen, "no context");
        return -1;
    }
    ctx->n_ents = 0;
    int64_t n_rows = 0, n_hrows = 0;
    int rc = validate(ctx, entries, n_entries, &n_rows, &n_hrows, err, errlen);
    if (rc == 0 && (grow_rows(&ctx->logits, &ctx->logits_cap, n_rows, ctx->hp.n_vocab) != 0 ||
                    grow_rows(&ctx->hidden, &ctx->hidden_cap, n_hrows, ctx->hp.n_embd) != 0)) {
        bn_set_err(err, errlen, "out of memory for %lld logits and %lld hidden rows",
                   (long long)n_rows, (long long)n_hrows);
        rc = 1; /* no entry at fault: every status -2 */
    }
    if (rc != 0) {
        /* nothing was applied: the offending entry -1, every other -2 */
        int32_t bad = rc <= -1 ? -1 - rc : -1;
        for (int32_t e = 0; e < n_entries && entries; e++)
            entries[e].status = e == bad ? -1 : -2;
        return -1;
    }

    const bn_kernel_set *k = bn_kernels();
    for (int32_t e = 0; e < n_entries; e++) {
        entry_state *st = &ctx->ents[e];
        st->mode = entries[e].logits;
        st->n_tokens = entries[e].n_tokens;
        st->done = 0;
        st->orig_pos = ctx->pos[entries[e].slot];
        st->base_row = -1;
        st->status = 0;
    }
    int64_t next_row = 0, next_hrow = 0;
    int32_t e = 0; /* entry holding the next unprocessed token */
    for (;;) {
        /* cancellation is checked before every chunk: a cancelled entry is rolled back */
        for (int32_t c = 0; c < n_entries; c++) {
            entry_state *st = &ctx->ents[c];
            if (st->status == 0 && st->done < st->n_tokens && entry_cancelled(&entries[c])) {
                st->status = 1;
                ctx->pos[entries[c].slot] = st->orig_pos;
            }
        }
        while (e < n_entries &&
               (ctx->ents[e].status != 0 || ctx->ents[e].done >= ctx->ents[e].n_tokens))
            e++;
        if (e >= n_entries)
            break;
        int32_t T = 0;
        for (int32_t c = e; c < n_entries && T < ctx->max_chunk; c++) {
            entry_state *st = &ctx->ents[c];
            const bn_batch_entry *be = &entries[c];
            if (st->status != 0)
                continue;
            while (st->done < st->n_tokens && T < ctx->max_chunk) {
                const int32_t t = st->done;
                const int last = t == st->n_tokens - 1;
                const int want = st->mode == BN_LOGITS_ALL || (st->mode == BN_LOGITS_LAST && last);
                const int want_h =
                    st->mode == BN_HIDDEN_ALL || (st->mode == BN_HIDDEN_LAST && last);
                ctx->tok_slot[T] = be->slot;
                ctx->tok_pos[T] = st->orig_pos + t;
                ctx->tok_id[T] = be->tokens[t];
                ctx->tok_row[T] = want ? (int32_t)next_row : -1;
                ctx->tok_hrow[T] = want_h ? (int32_t)next_hrow : -1;
                if (want) {
                    if (st->base_row < 0)
                        st->base_row = next_row;
                    next_row++;
                }
                if (want_h) {
                    if (st->base_row < 0)
                        st->base_row = next_hrow;
                    next_hrow++;
                }
                st->done++;
                T++;
            }
            ctx->pos[be->slot] = st->orig_pos + st->done;
        }
        bn_forward_chunk(ctx, k, T);
    }
    for (int32_t c = 0; c < n_entries; c++)
        entries[c].status = ctx->ents[c].status;
    ctx->n_ents = n_entries;
    return 0;
}

/* The output row of entry `entry`, token t, for an entry run in mode `all` (every token) or
 * `last` (its last token); -1 when that token has no such row. */
static int64_t output_row(const bn_context *ctx, int32_t entry, int32_t t, int32_t all,
                          int32_t last)
{
    if (!ctx || entry < 0 || entry >= ctx->n_ents)
        return -1;
    const entry_state *st = &ctx->ents[entry];
    if (st->status != 0 || st->base_row < 0 || t < 0 || t >= st->n_tokens)
        return -1;
    if (st->mode == all)
        return st->base_row + t;
    if (st->mode == last && t == st->n_tokens - 1)
        return st->base_row;
    return -1;
}

const float *bn_logits(const bn_context *ctx, int32_t entry, int32_t t)
{
    const int64_t row = output_row(ctx, entry, t, BN_LOGITS_ALL, BN_LOGITS_LAST);
    return row < 0 ? NULL : ctx->logits + (size_t)row * (size_t)ctx->hp.n_vocab;
}

const float *bn_hidden(const bn_context *ctx, int32_t entry, int32_t t)
{
    const int64_t row = output_row(ctx, entry, t, BN_HIDDEN_ALL, BN_HIDDEN_LAST);
    return row < 0 ? NULL : ctx->hidden + (size_t)row * (size_t)ctx->hp.n_embd;
}
