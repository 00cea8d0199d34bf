/* arch.c - the table of supported graphs (model-format §10.1, §10.2). */
#include "arch.h"

#include <string.h>

static const bn_arch ARCHS[] = {
    /* BitNet b1.58 2B-4T, the official file; bitnet-25 is an earlier upload of the same graph
     * (model-format §2.1, §5) */
    {.name = "bitnet-b1.58",
     .alias = "bitnet-25",
     .graph = "BitNet b1.58",
     .sub_norms = 1,
     .activation = BN_ACT_RELU_SQ,
     .rope_pairing = BN_ROPE_NEOX,
     .head_dim_rule = BN_HEAD_DIM_E_OVER_H,
     .weight_format = BN_WFMT_I2_S,
     .head_optional = 1,
     .default_rms_eps = 1e-5f,
     .default_rope_base = 10000.0f},
    /* Llama graph with I2_S projections: Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58
     * (model-format §10.4) */
    {.name = "llama",
     .graph = "Llama (I2_S)",
     .sub_norms = 0,
     .activation = BN_ACT_SILU,
     .rope_pairing = BN_ROPE_ADJACENT,
     .head_dim_rule = BN_HEAD_DIM_FROM_KEYS,
     .weight_format = BN_WFMT_I2_S,
     .head_optional = 1,
     .default_rms_eps = 1e-5f,
     .default_rope_base = 10000.0f},
    /* Qwen3 graph with I2_S projections and per-projection input norms: Microsoft's
     * BitNet-embedding-0.6B (model-format §10.5) */
    {.name = "qwen3",
     .graph = "Qwen3 BitNet embedding (I2_S)",
     .sub_norms = 0,
     .qk_norm = 1,
     .proj_in_norms = 1,
     .norms_f16 = 1,
     .activation = BN_ACT_SILU,
     .rope_pairing = BN_ROPE_NEOX,
     .head_dim_rule = BN_HEAD_DIM_FROM_KEYS,
     .weight_format = BN_WFMT_I2_S,
     .head_optional = 1,
     .pooling = 3,
     .default_rms_eps = 1e-6f,
     .default_rope_base = 1000000.0f},
    /* Qwen3 graph with Q2_0 weights: PrismML's Ternary Bonsai (model-format §10.6) */
    {.name = "qwen3",
     .graph = "Qwen3 (Q2_0, Ternary Bonsai)",
     .sub_norms = 0,
     .qk_norm = 1,
     .proj_in_norms = 0,
     .norms_f16 = 0,
     .activation = BN_ACT_SILU,
     .rope_pairing = BN_ROPE_NEOX,
     .head_dim_rule = BN_HEAD_DIM_FROM_KEYS,
     .weight_format = BN_WFMT_Q2_0,
     .head_optional = 1,
     .pooling = 0,
     .default_rms_eps = 1e-6f,
     .default_rope_base = 1000000.0f},
};

/* The ggml tensor type of each weight format (model-format §10.1.5). */
static int64_t format_type(uint8_t f)
{
    switch (f) {
    case BN_WFMT_I2_S: return 36;
    case BN_WFMT_Q2_0: return 42;
    default: return -2; /* never a file's type */
    }
}

static int named(const bn_arch *a, const char *name, size_t len)
{
    for (int k = 0; k < 2; k++) {
        const char *n = k ? a->alias : a->name;
        if (n && strlen(n) == len && memcmp(n, name, len) == 0)
            return 1;
    }
    return 0;
}

const bn_arch *bn_arch_find(const char *name, size_t len, int64_t proj_type)
{
    const bn_arch *first = NULL;
    for (size_t i = 0; i < sizeof ARCHS / sizeof ARCHS[0]; i++) {
        if (!named(&ARCHS[i], name, len))
            continue;
        if (format_type(ARCHS[i].weight_format) == proj_type)
            return &ARCHS[i];
        if (!first)
            first = &ARCHS[i];
    }
    return first;
}

const char *bn_arch_supported_list(void)
{
    return "'bitnet-b1.58', 'bitnet-25', 'llama' or 'qwen3'";
}

int32_t bn_arch_layer_tensors(const bn_arch *a)
{
    /* attn_norm, q, k, v, o, ffn_norm, gate, up, down; plus the optional groups */
    return 9 + (a->sub_norms ? 2 : 0) + (a->qk_norm ? 2 : 0) + (a->proj_in_norms ? 7 : 0);
}
