/* context.h - internal: struct bn_context, shared by context.c (lifetime, slots, KV cache,
 * batching) and forward.c (the arithmetic of one chunk of tokens). Not part of the API.
 *
 * Shapes are written outermost first, with the element type: [T][n_embd] f32 is T rows of
 * n_embd floats. T is max_chunk, the most tokens one bn_forward_chunk call takes.
 */
#ifndef BITNET_CONTEXT_H
#define BITNET_CONTEXT_H

#include <stddef.h>
#include <stdint.h>

#include "bitnet.h"
#include "kernels/kernels.h"
#include "model.h"
#include "threadpool.h"

/* Largest number of tokens one internal step processes; longer calls run in chunks. */
#define BN_MAX_CHUNK 512

/* Per-entry bookkeeping of the last bn_forward call. */
typedef struct {
    int32_t mode; /* BN_LOGITS_* or BN_HIDDEN_* */
    int32_t n_tokens;
    int32_t done;     /* tokens processed so far */
    int32_t orig_pos; /* slot position before the call */
    int64_t base_row; /* first logits (or hidden) row, -1 if none yet */
    int32_t status;
} entry_state;

struct bn_context {
    const bn_model *m;
    bn_hparams hp;
    int32_t n_slots, n_ctx;
    int32_t max_chunk; /* T = min(BN_MAX_CHUNK, n_slots * n_ctx) */
    int32_t kv_dim;    /* n_head_kv * head_dim */
    int32_t q_dim;     /* n_head * head_dim (n_embd for BitNet; model-format §10.1.4) */
    int32_t n_wide;    /* max(n_embd, n_ff, q_dim): the widest BitLinear input */
    bn_pool *pool;

    /* per slot, kept across calls (model-format §5.2.4) */
    float *kcache; /* [n_slots][n_layer][n_ctx][kv_dim] f32, keys after RoPE */
    float *vcache; /* [n_slots][n_layer][n_ctx][kv_dim] f32 */
    int32_t *pos;  /* [n_slots] i32: tokens held, the next token's position */
    /* RoPE angles of every position (model-format §5.2.3), computed once */
    float *rope_cos; /* [n_ctx][head_dim/2] f32 */
    float *rope_sin; /* [n_ctx][head_dim/2] f32 */

    /* chunk scratch, T token rows each; overwritten by every chunk */
    float *x;                 /* [T][n_embd] f32: the residual stream */
    float *h;                 /* [T][n] f32, n = n_embd or n_ff: RMSNorm output, the input
                               * of the next BitLinear (n_wide wide when allocated) */
    float *h_in;              /* [T][n] f32: a projection's input norm of h (n_wide wide;
                               * only for graphs with input norms, model-format §10.5.2) */
    float *q;                 /* [T][n_head][head_dim] f32: queries (q_dim wide) */
    float *k;                 /* [T][n_head_kv][head_dim] f32: keys of this chunk */
    float *v;                 /* [T][n_head_kv][head_dim] f32: values of this chunk */
    float *att;               /* [T][n_head][head_dim] f32: attention output, heads
                               * concatenated (q_dim wide) */
    float *g;                 /* [T][n_ff] f32: gate projection, then the gated f */
    float *u;                 /* [T][n_ff] f32: up projection */
    float *tmp;               /* [T][n_embd] f32: attn_output / ffn_down before the residual */
    float *ynorm;             /* [T][n_embd] f32: output-normed rows of the tokens that want
                               * logits, packed */
    int8_t *qa;               /* [T][n] i8, n = n_embd or n_ff: quantized h
                               * (model-format §5.4.2) */
    int8_t *qa_tiles;         /* [T * n] i8: qa rearranged by the kernel set's prepare */
    float *qa_s;              /* [T] f32: quantization scale 127 / absmax (model-format §5.4.1) */
    int32_t *qa_sum;          /* [T] i32: sum of the row of qa (model-format §5.4.3) */
    int32_t *tok_slot;        /* [T] i32: slot of each token of the chunk */
    int32_t *tok_pos;         /* [T] i32: its position in the slot */
    int32_t *tok_id;          /* [T] i32: its token id */
    int32_t *tok_row;         /* [T] i32: its logits row, or -1 when no logits are wanted */
    int32_t *tok_hrow;        /* [T] i32: its hidden row, or -1 when no hidden state is wanted */
    float *scores;            /* [n_threads][group][n_ctx] f32, group = n_head / n_head_kv:
                               * attention scores, one block per pool thread */
    size_t scores_per_thread; /* group * n_ctx */

    /* results of the last bn_forward */
    float *logits; /* [logits_cap][n_vocab] f32 */
    int64_t logits_cap;
    float *hidden; /* [hidden_cap][n_embd] f32: final-norm rows y (model-format §5.3.1) */
    int64_t hidden_cap;
    entry_state *ents;  /* [n_slots] (entries are distinct slots) */
    int32_t n_ents;     /* entries of the last successful bn_forward */
    int32_t *slot_seen; /* [n_slots] i32: duplicate detection stamps */
    int32_t stamp;
};

/* forward.c: cos and sin of the RoPE angles of position pos, D/2 each (model-format §5.2.3). */
void bn_rope_angles(int32_t pos, int32_t D, float base, const bn_rope_scaling *sc, float *cosv,
                    float *sinv);
/* forward.c: run the tokens tok_*[0..T) through the model, logits for the tokens whose
 * tok_row >= 0 (consecutive rows starting at the first such row), the final-norm row y into
 * hidden[tok_hrow] for the tokens whose tok_hrow >= 0. */
void bn_forward_chunk(bn_context *ctx, const bn_kernel_set *k, int32_t T);

#endif
