/* model.h - internal: the loaded model as the forward pass sees it. Not part of the API. */
#ifndef BITNET_MODEL_H
#define BITNET_MODEL_H

#include "arch.h"
#include "bitnet.h"
#include "gguf.h"

/* Norm weights are f32 here: F32 tensors point into the mapping, F16 ones at copies made at
 * load (norm_copies). */

/* An I2_S ternary matrix used in place from the mapping (model-format §4). */
typedef struct {
    const uint8_t *codes; /* [n_out][n_in/4] 2-bit codes, 32-byte blocks of 128 weights */
    float scale;          /* per-tensor weight scale (read from byte n_out*n_in/4) */
    int32_t n_in;         /* K = ne[0], multiple of 128 (I2_S) or 64 (Q2_0) */
    int32_t n_out;        /* rows = ne[1] */
    uint8_t fmt;          /* bn_weight_format: BN_WFMT_I2_S (0), or BN_WFMT_Q2_0 whose codes
                           * are n_out rows of n_in/64 18-byte blocks and scale is unused
                           * (model-format §10.6.1) */
} bn_ternary;

typedef struct {
    const float *attn_norm;   /* [n_embd] F32 */
    const float *attn_q_norm; /* [head_dim] f32: per-head QK-norm, or NULL (§10.5.2) */
    const float *attn_k_norm; /* [head_dim] f32, or NULL */
    /* per-projection input norms (model-format §10.5.2), NULL without them: the input of
     * that projection, each [its n_in] f32 */
    const float *q_in, *k_in, *v_in, *o_in, *gate_in, *up_in, *down_in;
    bn_ternary wq;              /* n_in n_embd, n_out n_head*head_dim */
    bn_ternary wk;              /* n_in n_embd, n_out n_head_kv*head_dim */
    bn_ternary wv;              /* n_in n_embd, n_out n_head_kv*head_dim */
    const float *attn_sub_norm; /* [n_head*head_dim] F32; NULL without sub-norms */
    bn_ternary wo;              /* n_in n_head*head_dim, n_out n_embd */
    const float *ffn_norm;      /* [n_embd] F32 */
    bn_ternary w_gate;          /* n_in n_embd, n_out n_ff */
    bn_ternary w_up;            /* n_in n_embd, n_out n_ff */
    const float *ffn_sub_norm;  /* [n_ff] F32; NULL without sub-norms */
    bn_ternary w_down;          /* n_in n_ff, n_out n_embd */
} bn_layer;

struct bn_model {
    bn_gguf *file; /* the mapping and parsed metadata; owns the memory */
    bn_hparams hp;
    const bn_arch *arch;      /* the graph's description (model-format §10.1) */
    const uint16_t *tok_embd; /* [n_vocab][n_embd] F16 (IEEE binary16 bits), or NULL when
                               * token_embd is Q2_0 (tok_embd_q2) or Q8_0 (tok_embd_q8) */
    const uint16_t *head;     /* [n_vocab][n_embd] F16: output.weight, or tok_embd if tied;
                               * NULL when the head is Q2_0 (head_q2) or Q8_0 (head_q8) */
    bn_ternary tok_embd_q2;   /* Q2_0 token_embd (codes NULL otherwise, model-format §10.6.3) */
    bn_ternary head_q2;       /* Q2_0 head: output.weight, or token_embd if tied */
    /* Q8_0 token_embd and head (model-format §10.1.6): [n_vocab] rows of n_embd/32 34-byte
     * blocks, or NULL; at most one of tok_embd, tok_embd_q2.codes, tok_embd_q8 is set, and
     * likewise for the head */
    const uint8_t *tok_embd_q8;
    const uint8_t *head_q8;
    const float *output_norm; /* [n_embd] F32 */
    bn_layer *layers;         /* [n_layer] */
    /* f32 copies of F16 norm weights (model-format §10.1.1), made once at load */
    float **norm_copies;
    size_t n_norm_copies, cap_norm_copies;
    /* Q2_0 data repacked at load from PrismML's 34-byte blocks of 128 (model-format §10.6.1) */
    uint8_t **repacked;
    size_t n_repacked, cap_repacked;
};

#endif
