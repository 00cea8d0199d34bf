/* arch.h - internal: the model description, one per supported general.architecture
 * (model-format §10.1). The loader (model.c) reads which tensors and keys a graph has from
 * here, and the forward pass (forward.c) which variant of each step to run, so a new graph of
 * the same shape family is a new table entry rather than a fork of forward.c. */
#ifndef BITNET_ARCH_H
#define BITNET_ARCH_H

#include <stddef.h>
#include <stdint.h>

/* The FFN activation between gate/up and down (model-format §10.1.2). */
typedef enum {
    BN_ACT_RELU_SQ = 0, /* f = max(g, 0)^2 * u (BitNet b1.58, model-format §5.2.9) */
    BN_ACT_SILU = 1     /* f = silu(g) * u, silu(g) = g / (1 + exp(-g)) (model-format §10.4.2) */
} bn_activation;

/* Which two dimensions of a head RoPE rotates together (model-format §10.1.3). */
typedef enum {
    BN_ROPE_NEOX = 0,    /* (i, i + D/2): model-format §5.2.3 */
    BN_ROPE_ADJACENT = 1 /* (2i, 2i + 1): model-format §10.4.1 */
} bn_rope_pairing;

/* How a linear layer's weights are stored (model-format §10.1.5). I2_S and Q2_0 are
 * implemented; the others name formats a description may ask for, refused for now. */
typedef enum {
    BN_WFMT_I2_S = 0,  /* ggml type 36, per-tensor f32 scale (model-format §4) */
    BN_WFMT_Q2_0 = 1,  /* ggml type 42, per-64 fp16 scale (model-format §10.6) */
    BN_WFMT_TQ2_0 = 2, /* not implemented */
    BN_WFMT_TQ1_0 = 3  /* not implemented */
} bn_weight_format;

/* Where the head dimension D comes from (model-format §10.1.4). */
typedef enum {
    BN_HEAD_DIM_E_OVER_H = 0, /* D = E / H, and rope.dimension_count (required) must equal it */
    BN_HEAD_DIM_FROM_KEYS = 1 /* D = attention.key_length, else rope.dimension_count, else
                               * E / H; may differ from E / H */
} bn_head_dim_rule;

typedef struct {
    const char *name;  /* general.architecture, also the key prefix */
    const char *alias; /* another name of the same graph, or NULL */
    const char *graph; /* a short human name of the graph, for messages */
    uint8_t sub_norms; /* attn_sub_norm and ffn_sub_norm exist (model-format §5.2.6, §5.2.9) */
    uint8_t qk_norm;   /* attn_q_norm / attn_k_norm exist (model-format §10.5.2) */
    uint8_t proj_in_norms;   /* blk.N.<proj>_norm_in exist, and each projection quantizes its
                              * own normed copy of its input (model-format §10.5.2) */
    uint8_t norms_f16;       /* every norm weight is F16 (converted to f32 once at load),
                              * else F32 (model-format §10.1.1) */
    uint8_t activation;      /* bn_activation */
    uint8_t rope_pairing;    /* bn_rope_pairing */
    uint8_t head_dim_rule;   /* bn_head_dim_rule */
    uint8_t weight_format;   /* bn_weight_format of the seven projections */
    uint8_t head_optional;   /* the head is output.weight (F16) when present, else token_embd */
    uint8_t pooling;         /* the pooling the graph is defined with, as llama.cpp numbers
                              * ARCH.pooling_type (3 = last token); 0 for a decoder
                              * (model-format §10.5.4) */
    float default_rms_eps;   /* when attention.layer_norm_rms_epsilon is absent */
    float default_rope_base; /* when rope.freq_base is absent */
} bn_arch;

/* The description of architecture `name` (len bytes, not NUL-terminated), or NULL. One name
 * may have several descriptions that differ in the weight format of the projections
 * (model-format §10.2): proj_type is the ggml type of the file's blk.0.attn_q.weight (or -1
 * when it has none), and the entry of that format is returned, else the name's first one. */
const bn_arch *bn_arch_find(const char *name, size_t len, int64_t proj_type);
/* "'bitnet-b1.58', 'bitnet-25', 'llama' or 'qwen3'": the supported names, for messages. */
const char *bn_arch_supported_list(void);
/* Tensors per layer of the graph (for the block_count plausibility check). */
int32_t bn_arch_layer_tensors(const bn_arch *a);

#endif
