/* model.c - model loader (model-format §2-§4, §10): finds the architecture's description
 * (arch.c), checks the hyper-parameters and every tensor's type and shape against it, then
 * points the bn_model fields into the mapping (zero copies).
 *
 * Required keys (under "<arch>."): context_length, embedding_length, block_count,
 * feed_forward_length, attention.head_count, attention.head_count_kv, and for the BitNet
 * graphs rope.dimension_count (model-format §2.3; the head-dimension keys of other graphs:
 * model-format §10.1.4). Optional keys with defaults from the description: rope.freq_base and
 * attention.layer_norm_rms_epsilon. Optional checked keys: vocab_size and
 * tokenizer.ggml.tokens must agree with token_embd; RoPE scaling "none", "linear" or "yarn"
 * with the keys each needs (model-format §5.2.3.1), any other type refused.
 */
#include "error.h"
#include "kernels/kernels.h"
#include "model.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    bn_model *m;
    char *err;
    size_t errlen;
    char arch[32];
    const bn_arch *a;
} loader;

static int lfail(loader *L, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    bn_vset_err(L->err, L->errlen, fmt, ap);
    va_end(ap);
    return -1;
}

static const char *type_name(uint32_t t)
{
    switch (t) {
    case BN_TYPE_F32: return "F32";
    case BN_TYPE_F16: return "F16";
    case BN_TYPE_Q8_0: return "Q8_0";
    case BN_TYPE_I2_S: return "I2_S";
    case BN_TYPE_Q2_0: return "Q2_0";
    default: return "?";
    }
}

static const char *meta_type_name(int t)
{
    static const char *names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                  "bool", "string", "array", "u64", "i64", "f64"};
    return t >= 0 && t < (int)(sizeof names / sizeof names[0]) ? names[t] : "unknown";
}

/* ---- hyper-parameters ---- */

/* An integer key "<arch>.<suffix>" as a positive int32. */
static int arch_int(loader *L, const char *suffix, int required, int32_t *out)
{
    char key[96];
    snprintf(key, sizeof key, "%s.%s", L->arch, suffix);
    int64_t idx = bn_meta_find(L->m, key);
    if (idx < 0) {
        if (required)
            return lfail(L, "missing key '%s'", key);
        return 1; /* absent: caller keeps its value */
    }
    int t = bn_meta_type(L->m, idx);
    if (t != BN_GGUF_U32 && t != BN_GGUF_I32 && t != BN_GGUF_U64)
        return lfail(L, "key '%s' has type %s, expected an integer (u32, i32 or u64)", key,
                     meta_type_name(t));
    int64_t v;
    if (bn_meta_get_i64(L->m, idx, &v) != 0) /* a u64 above INT64_MAX */
        return lfail(L, "key '%s' is out of range (must be 1..%d)", key, INT32_MAX);
    if (v <= 0 || v > INT32_MAX)
        return lfail(L, "key '%s' = %lld is out of range (must be 1..%d)", key, (long long)v,
                     INT32_MAX);
    *out = (int32_t)v;
    return 0;
}

/* The float key "<arch>.<suffix>" (f32 or f64) into *v, its name into key[96]: 1 when
 * absent, 0 when read, -1 on a wrong type (naming the key). Callers check the range. */
static int arch_float_value(loader *L, const char *suffix, char key[96], double *v)
{
    snprintf(key, 96, "%s.%s", L->arch, suffix);
    int64_t idx = bn_meta_find(L->m, key);
    if (idx < 0)
        return 1;
    int t = bn_meta_type(L->m, idx);
    if ((t != BN_GGUF_F32 && t != BN_GGUF_F64) || bn_meta_get_f64(L->m, idx, v) != 0)
        return lfail(L, "key '%s' has type %s, expected a float (f32 or f64)", key,
                     meta_type_name(t));
    return 0;
}

/* A float key "<arch>.<suffix>" that must be finite and positive; default when absent. */
static int arch_float(loader *L, const char *suffix, float dflt, float *out)
{
    char key[96];
    double v;
    int r = arch_float_value(L, suffix, key, &v);
    if (r != 0) {
        *out = dflt;
        return r < 0 ? -1 : 0;
    }
    /* also rejects NaN, what overflows a float and an f64 that rounds to a float 0 */
    if (!(v > 0.0) || !(v <= 3.0e38) || !((float)v > 0.0f))
        return lfail(L, "key '%s' = %g is out of range (must be finite and > 0)", key, v);
    *out = (float)v;
    return 0;
}

static int read_architecture(loader *L)
{
    int64_t idx = bn_meta_find(L->m, "general.architecture");
    if (idx < 0)
        return lfail(L, "missing key 'general.architecture'");
    size_t len;
    const char *s = bn_meta_get_str(L->m, idx, &len);
    if (!s)
        return lfail(L, "key 'general.architecture' has type %s, expected string",
                     meta_type_name(bn_meta_type(L->m, idx)));
    /* one architecture name can cover graphs that differ by the weight format of their
     * projections (model-format §10.2): the type of the first one picks the description */
    const bn_gguf_tensor *q0 = bn_gguf_tensor_find(L->m->file, "blk.0.attn_q.weight");
    const bn_arch *a = bn_arch_find(s, len, q0 ? (int64_t)q0->type : -1);
    if (a) {
        memcpy(L->arch, s, len); /* len < sizeof L->arch: every table name is short */
        L->arch[len] = '\0';
        L->a = a;
        L->m->arch = a;
        if (a->weight_format != BN_WFMT_I2_S &&
            a->weight_format != BN_WFMT_Q2_0) /* model-format §10.1.5 */
            return lfail(L, "architecture '%s': its weight format is not implemented", L->arch);
        return 0;
    }
    char shown[48];
    size_t n = len < 40 ? len : 40;
    for (size_t i = 0; i < n; i++)
        shown[i] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
    shown[n] = '\0';
    if (len == 6 && memcmp(s, "bitnet", 6) == 0)
        return lfail(L,
                     "unsupported architecture 'bitnet' (general.architecture): that is the "
                     "older BitNet graph; this engine runs %s",
                     bn_arch_supported_list());
    return lfail(L, "unsupported architecture '%s%s' (general.architecture); expected %s", shown,
                 len > n ? "..." : "", bn_arch_supported_list());
}

/* The head dimension of a graph whose description takes it from the keys (model-format
 * §10.1.4): attention.key_length, else rope.dimension_count, else E / H. The other two keys,
 * when present, must agree: partial rotary embeddings and a value width other than the key
 * width are not supported. */
static int head_dim_from_keys(loader *L)
{
    bn_hparams *hp = &L->m->hp;
    const char *a = L->arch;
    int32_t key_len = 0, val_len = 0, rope_dims = 0;
    int rk = arch_int(L, "attention.key_length", 0, &key_len);
    int rv = rk < 0 ? -1 : arch_int(L, "attention.value_length", 0, &val_len);
    int rr = rv < 0 ? -1 : arch_int(L, "rope.dimension_count", 0, &rope_dims);
    if (rr < 0)
        return -1;
    hp->head_dim = rk == 0 ? key_len : rr == 0 ? rope_dims : hp->n_embd / hp->n_head;
    const char *from = rk == 0   ? "attention.key_length"
                       : rr == 0 ? "rope.dimension_count"
                                 : "embedding_length / attention.head_count";
    if (rk != 0 && rr != 0 && hp->n_embd % hp->n_head != 0)
        return lfail(L,
                     "%s.embedding_length %d is not a multiple of %s.attention.head_count %d "
                     "and no key gives the head dimension",
                     a, hp->n_embd, a, hp->n_head);
    if (rv == 0 && val_len != hp->head_dim)
        return lfail(L, "%s.attention.value_length %d differs from the head dimension %d", a,
                     val_len, hp->head_dim);
    if (rr == 0 && rope_dims != hp->head_dim)
        return lfail(L,
                     "%s.rope.dimension_count %d differs from the head dimension %d: partial "
                     "rotary embeddings are not supported",
                     a, rope_dims, hp->head_dim);
    if (hp->head_dim % 2 != 0)
        return lfail(L, "head dimension %d (%s.%s) is odd; RoPE needs it even", hp->head_dim, a,
                     from);
    if (hp->head_dim > 4096)
        return lfail(L, "head dimension %d (%s.%s) is out of range (must be at most 4096)",
                     hp->head_dim, a, from);
    /* attn_output's input is the H heads of D concatenated, an I2_S row (model-format §4) */
    if ((int64_t)hp->n_head * hp->head_dim % 128 != 0 ||
        (int64_t)hp->n_head * hp->head_dim > (1 << 20))
        return lfail(L,
                     "%s.attention.head_count %d x head dimension %d = %lld is not a multiple of "
                     "128 up to 2^20 (the attn_output input)",
                     a, hp->n_head, hp->head_dim, (long long)hp->n_head * hp->head_dim);
    return 0;
}

/* A float key "<arch>.<suffix>" of the RoPE scaling, finite and within [lo, hi]: 1 when
 * absent (*out kept), 0 when read, -1 on error naming the key. */
static int scaling_float(loader *L, const char *suffix, double lo, double hi, float *out)
{
    char key[96];
    double v;
    int r = arch_float_value(L, suffix, key, &v);
    if (r != 0)
        return r;
    if (!(v >= lo && v <= hi)) /* also NaN */
        return lfail(L, "key '%s' = %g is out of range (must be finite, %g to %g)", key, v, lo, hi);
    *out = (float)v;
    return 0;
}

/* ARCH.rope.scaling.* (model-format §5.2.3.1): type "none", "linear" or "yarn", and the keys
 * each needs. Every key that is read is checked; a type this engine does not compute is
 * refused, since running the file with unscaled angles would be another model. An absent
 * type with a factor is linear scaling, as llama.cpp reads such files (its default type);
 * rope.scale_linear is the older name of the factor key. */
static int read_rope_scaling(loader *L)
{
    bn_rope_scaling *sc = &L->m->hp.rope_scaling;
    *sc = (bn_rope_scaling){.type = BN_ROPE_SCALING_NONE,
                            .factor = 1.0f,
                            .orig_ctx = 0,
                            .beta_fast = 32.0f,
                            .beta_slow = 1.0f,
                            .attn_factor = 1.0f};
    char key[96];
    snprintf(key, sizeof key, "%s.rope.scaling.type", L->arch);
    int64_t idx = bn_meta_find(L->m, key);
    int typed = idx >= 0;
    int32_t type = BN_ROPE_SCALING_LINEAR;
    if (typed) {
        size_t len;
        const char *s = bn_meta_get_str(L->m, idx, &len);
        if (!s)
            return lfail(L, "key '%s' has type %s, expected string", key,
                         meta_type_name(bn_meta_type(L->m, idx)));
        if (len == 4 && memcmp(s, "none", 4) == 0)
            type = BN_ROPE_SCALING_NONE;
        else if (len == 6 && memcmp(s, "linear", 6) == 0)
            type = BN_ROPE_SCALING_LINEAR;
        else if (len == 4 && memcmp(s, "yarn", 4) == 0)
            type = BN_ROPE_SCALING_YARN;
        else {
            char shown[48];
            size_t n = len < 40 ? len : 40;
            for (size_t i = 0; i < n; i++)
                shown[i] = (s[i] >= 0x20 && s[i] < 0x7f) ? s[i] : '?';
            shown[n] = '\0';
            return lfail(L,
                         "key '%s' = '%s%s': RoPE scaling type not supported (none, linear or "
                         "yarn)",
                         key, shown, len > n ? "..." : "");
        }
    }
    /* attn_factor multiplies cos and sin whatever the type, as in llama.cpp */
    if (scaling_float(L, "rope.scaling.attn_factor", 1e-3, 16.0, &sc->attn_factor) < 0)
        return -1;
    if (type == BN_ROPE_SCALING_NONE)
        return 0; /* a factor next to "none" is not used (llama.cpp does the same) */
    /* the factor: up to 1024 (real files use 4 to 40); below 1 would compress positions,
     * which no published model does */
    int rf = scaling_float(L, "rope.scaling.factor", 1.0, 1024.0, &sc->factor);
    if (rf == 1)
        rf = scaling_float(L, "rope.scale_linear", 1.0, 1024.0, &sc->factor);
    if (rf < 0)
        return -1;
    if (rf == 1) {
        if (!typed)
            return 0; /* no scaling key at all */
        return lfail(L, "key '%s.rope.scaling.factor' is missing (required for RoPE scaling '%s')",
                     L->arch, type == BN_ROPE_SCALING_YARN ? "yarn" : "linear");
    }
    sc->type = type;
    if (type == BN_ROPE_SCALING_LINEAR)
        return 0;
    char okey[96];
    snprintf(okey, sizeof okey, "%s.rope.scaling.original_context_length", L->arch);
    if (bn_meta_find(L->m, okey) < 0)
        return lfail(L, "key '%s' is missing (required for RoPE scaling 'yarn')", okey);
    if (arch_int(L, "rope.scaling.original_context_length", 1, &sc->orig_ctx) < 0 ||
        scaling_float(L, "rope.scaling.yarn_beta_fast", 1e-3, 1e4, &sc->beta_fast) < 0 ||
        scaling_float(L, "rope.scaling.yarn_beta_slow", 1e-3, 1e4, &sc->beta_slow) < 0)
        return -1;
    /* the ramp bounds divide by ln(base) (model-format §5.2.3.1) */
    if (!(L->m->hp.rope_base > 1.0f))
        return lfail(L, "%s.rope.freq_base %g: RoPE scaling 'yarn' needs a base above 1", L->arch,
                     (double)L->m->hp.rope_base);
    return 0;
}

static int read_hparams(loader *L)
{
    bn_hparams *hp = &L->m->hp;
    const bn_arch *arch = L->a;
    memcpy(hp->architecture, L->arch, sizeof hp->architecture);
    hp->pooling = arch->pooling;
    if (arch_int(L, "context_length", 1, &hp->n_ctx_train) < 0 ||
        arch_int(L, "embedding_length", 1, &hp->n_embd) < 0 ||
        arch_int(L, "block_count", 1, &hp->n_layer) < 0 ||
        arch_int(L, "feed_forward_length", 1, &hp->n_ff) < 0 ||
        arch_int(L, "attention.head_count", 1, &hp->n_head) < 0 ||
        arch_int(L, "attention.head_count_kv", 1, &hp->n_head_kv) < 0)
        return -1;
    int32_t rope_dims = 0;
    if (arch->head_dim_rule == BN_HEAD_DIM_E_OVER_H &&
        arch_int(L, "rope.dimension_count", 1, &rope_dims) < 0)
        return -1;
    if (arch_float(L, "rope.freq_base", arch->default_rope_base, &hp->rope_base) < 0 ||
        arch_float(L, "attention.layer_norm_rms_epsilon", arch->default_rms_eps, &hp->rms_eps) <
            0 ||
        read_rope_scaling(L) < 0)
        return -1;
    const char *a = L->arch;
    if (hp->n_head_kv > hp->n_head || hp->n_head % hp->n_head_kv != 0)
        return lfail(L,
                     "%s.attention.head_count %d is not a multiple of "
                     "%s.attention.head_count_kv %d",
                     a, hp->n_head, a, hp->n_head_kv);
    if (arch->head_dim_rule == BN_HEAD_DIM_FROM_KEYS)
        return head_dim_from_keys(L);
    if (hp->n_embd % hp->n_head != 0)
        return lfail(L, "%s.embedding_length %d is not a multiple of %s.attention.head_count %d", a,
                     hp->n_embd, a, hp->n_head);
    hp->head_dim = hp->n_embd / hp->n_head;
    if (hp->head_dim % 2 != 0)
        return lfail(L,
                     "head dimension %d (%s.embedding_length / %s.attention.head_count) is "
                     "odd; RoPE needs it even",
                     hp->head_dim, a, a);
    if (rope_dims != hp->head_dim)
        return lfail(L, "%s.rope.dimension_count %d differs from the head dimension %d", a,
                     rope_dims, hp->head_dim);
    return 0;
}

/* ---- tensors ---- */

static void format_shape(char *out, size_t outlen, const uint64_t ne[4], uint32_t n_dims)
{
    size_t j = (size_t)snprintf(out, outlen, "[");
    for (uint32_t d = 0; d < n_dims && j < outlen; d++)
        j +=
            (size_t)snprintf(out + j, outlen - j, d ? ", %llu" : "%llu", (unsigned long long)ne[d]);
    if (j < outlen)
        snprintf(out + j, outlen - j, "]");
}

/* The tensor `name` with type `type` and shape [ne0] (ne1 == 0) or [ne0, ne1]. Trailing unit
 * dimensions are ignored so that [n] and [n, 1] are the same shape. */
static const bn_gguf_tensor *need_tensor(loader *L, const char *name, uint32_t type, int64_t ne0,
                                         int64_t ne1)
{
    const bn_gguf_tensor *t = bn_gguf_tensor_find(L->m->file, name);
    if (!t) {
        lfail(L, "missing tensor '%s'", name);
        return NULL;
    }
    if (t->type != type) {
        lfail(L, "tensor '%s' has type %s, expected %s", name, type_name(t->type), type_name(type));
        return NULL;
    }
    uint64_t want[4] = {(uint64_t)ne0, ne1 > 0 ? (uint64_t)ne1 : 1, 1, 1};
    if (memcmp(t->ne, want, sizeof want) != 0) {
        char got[128], exp[64];
        format_shape(got, sizeof got, t->ne, t->n_dims);
        format_shape(exp, sizeof exp, want, ne1 > 0 ? 2 : 1);
        lfail(L, "tensor '%s' has shape %s, expected %s", name, got, exp);
        return NULL;
    }
    /* The forward pass reads F32/F16 tensors in place: they must be aligned for their type. */
    uintptr_t align = type == BN_TYPE_F32 ? 4 : type == BN_TYPE_F16 ? 2 : 1;
    if ((uintptr_t)t->data % align != 0) {
        lfail(L,
              "tensor '%s' (%s) data is not %u-byte aligned in memory (offset %llu; "
              "general.alignment too small?)",
              name, type_name(type), (unsigned)align, (unsigned long long)t->offset);
        return NULL;
    }
    return t;
}

/* A norm weight vector. Its few values are checked: a NaN or infinity here would silently
 * turn every logit into NaN. */
static const float *need_f32(loader *L, const char *name, int64_t n)
{
    const bn_gguf_tensor *t = need_tensor(L, name, BN_TYPE_F32, n, 0);
    if (!t)
        return NULL;
    const float *v = (const float *)(const void *)t->data;
    for (int64_t i = 0; i < n; i++)
        if (!isfinite(v[i])) {
            lfail(L, "tensor '%s' has a non-finite value at index %lld", name, (long long)i);
            return NULL;
        }
    return v;
}

/* A norm weight vector of the graph's norm type (model-format §10.1.1): F32 read in place,
 * F16 converted once to an f32 copy the model owns (so the forward pass reads f32 either way
 * and allocates nothing). Checked finite, as need_f32. */
static const float *need_norm(loader *L, const char *name, int64_t n)
{
    if (!L->a->norms_f16)
        return need_f32(L, name, n);
    const bn_gguf_tensor *t = need_tensor(L, name, BN_TYPE_F16, n, 0);
    if (!t)
        return NULL;
    bn_model *m = L->m;
    if (m->n_norm_copies == m->cap_norm_copies) {
        lfail(L, "tensor '%s': more norm tensors than the graph has", name);
        return NULL;
    }
    float *v = malloc((size_t)n * sizeof *v); /* n is backed by the file's data */
    if (!v) {
        lfail(L, "out of memory");
        return NULL;
    }
    m->norm_copies[m->n_norm_copies++] = v;
    for (int64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, t->data + 2 * i, sizeof h);
        v[i] = bn_f16_to_f32(h);
        if (!isfinite(v[i])) {
            lfail(L, "tensor '%s' has a non-finite value at index %lld", name, (long long)i);
            return NULL;
        }
    }
    return v;
}

/* PrismML's layout of type 42 (model-format §10.6.1) as Q2_0: each 34-byte block of 128
 * weights (scale d, 32 code bytes, weight j at bits 2*(j%4) of byte j/4) is two Q2_0 blocks
 * with the same d, the first 16 code bytes and the last 16. Blocks run along the rows in both
 * layouts, so the repack is one pass in file order; it is exact, so the kernels see the same
 * weights they would in a mainline file. */
static const uint8_t *repack_g128(loader *L, const bn_gguf_tensor *t)
{
    bn_model *m = L->m;
    if (!m->repacked) {
        /* the graph's type-42 tensors: 7 projections per layer, token_embd and output */
        m->cap_repacked = (size_t)m->hp.n_layer * 7 + 2;
        m->repacked = calloc(m->cap_repacked, sizeof *m->repacked);
        if (!m->repacked) {
            lfail(L, "out of memory");
            return NULL;
        }
    }
    if (m->n_repacked == m->cap_repacked) {
        lfail(L, "more Q2_0 tensors than the graph has");
        return NULL;
    }
    const uint64_t n_blocks = t->nbytes / 34; /* the reader checked nbytes = n / 128 * 34 */
    uint8_t *out = malloc((size_t)n_blocks * 2 * BN_Q2_0_BLOCK);
    if (!out) {
        lfail(L, "out of memory repacking a Q2_0 tensor of %llu bytes",
              (unsigned long long)t->nbytes);
        return NULL;
    }
    m->repacked[m->n_repacked++] = out;
    for (uint64_t b = 0; b < n_blocks; b++) {
        const uint8_t *src = t->data + b * 34;
        uint8_t *dst = out + b * 2 * BN_Q2_0_BLOCK;
        memcpy(dst, src, 2);
        memcpy(dst + 2, src + 2, 16);
        memcpy(dst + BN_Q2_0_BLOCK, src, 2);
        memcpy(dst + BN_Q2_0_BLOCK + 2, src + 18, 16);
    }
    return out;
}

/* A Q2_0 matrix (model-format §10.6.1): the reader checked ne[0] % 64 == 0 and that the
 * n/64 blocks of 18 bytes fit before the next tensor (or, in PrismML's layout, its 34-byte
 * blocks of 128, repacked here); the scales are read as they are used (a non-finite one only
 * makes that row's outputs non-finite). */
static int need_q2_0(loader *L, const char *name, int32_t n_in, int32_t n_out, bn_ternary *out)
{
    const bn_gguf_tensor *t = need_tensor(L, name, BN_TYPE_Q2_0, n_in, n_out);
    if (!t)
        return -1;
    out->codes = t->q2_0_g128 ? repack_g128(L, t) : t->data;
    if (!out->codes)
        return -1;
    out->scale = 0.0f;
    out->n_in = n_in;
    out->n_out = n_out;
    out->fmt = BN_WFMT_Q2_0;
    return 0;
}

static int need_ternary(loader *L, const char *name, int32_t n_in, int32_t n_out, bn_ternary *out)
{
    if (L->a->weight_format == BN_WFMT_Q2_0)
        return need_q2_0(L, name, n_in, n_out, out);
    const bn_gguf_tensor *t = need_tensor(L, name, BN_TYPE_I2_S, n_in, n_out);
    if (!t)
        return -1;
    /* The reader checked nbytes = n/4 + 32 inside the file: the scale is at byte n/4. */
    uint64_t n = (uint64_t)n_in * (uint64_t)n_out;
    float scale;
    memcpy(&scale, t->data + n / 4, sizeof scale);
    if (!isfinite(scale))
        return lfail(L, "tensor '%s' has a non-finite I2_S scale", name);
    out->codes = t->data;
    out->scale = scale;
    out->n_in = n_in;
    out->n_out = n_out;
    out->fmt = BN_WFMT_I2_S;
    return 0;
}

/* Per-layer tensors of the optional groups of model-format §10.1.1, with the description
 * flag that says the graph has them. */
static const struct {
    const char *suffix;
    size_t flag; /* offsetof the bn_arch flag */
    const char *what;
} OPTIONAL_TENSORS[] = {
    {"attn_sub_norm.weight", offsetof(bn_arch, sub_norms), "sub-norms"},
    {"ffn_sub_norm.weight", offsetof(bn_arch, sub_norms), "sub-norms"},
    {"attn_q_norm.weight", offsetof(bn_arch, qk_norm), "QK-norms"},
    {"attn_k_norm.weight", offsetof(bn_arch, qk_norm), "QK-norms"},
    {"attn_q_norm_in.weight", offsetof(bn_arch, proj_in_norms), "projection input norms"},
    {"attn_k_norm_in.weight", offsetof(bn_arch, proj_in_norms), "projection input norms"},
    {"attn_v_norm_in.weight", offsetof(bn_arch, proj_in_norms), "projection input norms"},
    {"attn_output_norm_in.weight", offsetof(bn_arch, proj_in_norms), "projection input norms"},
    {"ffn_gate_norm_in.weight", offsetof(bn_arch, proj_in_norms), "projection input norms"},
    {"ffn_up_norm_in.weight", offsetof(bn_arch, proj_in_norms), "projection input norms"},
    {"ffn_down_norm_in.weight", offsetof(bn_arch, proj_in_norms), "projection input norms"},
};

/* A tensor of a group the graph does not have means the file is another graph under this
 * architecture name: running it without that step would compute a different model
 * (model-format §10.3). */
static int refuse_foreign(loader *L, int32_t il)
{
    char name[64];
    for (size_t i = 0; i < sizeof OPTIONAL_TENSORS / sizeof OPTIONAL_TENSORS[0]; i++) {
        uint8_t has;
        memcpy(&has, (const char *)L->a + OPTIONAL_TENSORS[i].flag, 1);
        if (has)
            continue;
        snprintf(name, sizeof name, "blk.%d.%s", il, OPTIONAL_TENSORS[i].suffix);
        if (bn_gguf_tensor_find(L->m->file, name))
            return lfail(L, "tensor '%s' is not part of the %s graph ('%s' has no %s)", name,
                         L->a->graph, L->arch, OPTIONAL_TENSORS[i].what);
    }
    return 0;
}

/* Every per-layer tensor of the graph exists in layer 0, checked by name before the
 * block_count plausibility check: a file that lacks a whole group (the input norms of
 * model-format §10.5.2, say) is named for what it lacks, not for its tensor count. */
static int first_layer_complete(loader *L)
{
    static const char *const BASE[] = {"attn_norm.weight", "attn_q.weight",      "attn_k.weight",
                                       "attn_v.weight",    "attn_output.weight", "ffn_norm.weight",
                                       "ffn_gate.weight",  "ffn_up.weight",      "ffn_down.weight"};
    const size_t n_base = sizeof BASE / sizeof BASE[0];
    const size_t n_opt = sizeof OPTIONAL_TENSORS / sizeof OPTIONAL_TENSORS[0];
    char name[64];
    for (size_t i = 0; i < n_base + n_opt; i++) {
        const char *suffix = i < n_base ? BASE[i] : OPTIONAL_TENSORS[i - n_base].suffix;
        if (i >= n_base) {
            uint8_t has;
            memcpy(&has, (const char *)L->a + OPTIONAL_TENSORS[i - n_base].flag, 1);
            if (!has)
                continue;
        }
        snprintf(name, sizeof name, "blk.0.%s", suffix);
        if (!bn_gguf_tensor_find(L->m->file, name))
            return lfail(L, "missing tensor '%s' (the %s graph has it in every layer)", name,
                         L->a->graph);
    }
    return 0;
}

static int load_layer(loader *L, int32_t il, bn_layer *ly)
{
    const bn_hparams *hp = &L->m->hp;
    int32_t E = hp->n_embd, F = hp->n_ff, D = hp->head_dim;
    int32_t q_dim = hp->n_head * hp->head_dim, kv_dim = hp->n_head_kv * hp->head_dim;
    const int sub = L->a->sub_norms, qk = L->a->qk_norm, pin = L->a->proj_in_norms;
    if (refuse_foreign(L, il))
        return -1;
    char name[64];
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d." suffix, il), name)
/* the input norm of a projection (model-format §10.5.2), when the graph has them */
#define NORM_IN(field, suffix, n)                                                                  \
    if (pin && !(ly->field = need_norm(L, NAME(suffix "_norm_in.weight"), n)))                     \
        return -1;
    if (!(ly->attn_norm = need_norm(L, NAME("attn_norm.weight"), E)))
        return -1;
    NORM_IN(q_in, "attn_q", E)
    if (need_ternary(L, NAME("attn_q.weight"), E, q_dim, &ly->wq))
        return -1;
    NORM_IN(k_in, "attn_k", E)
    if (need_ternary(L, NAME("attn_k.weight"), E, kv_dim, &ly->wk))
        return -1;
    NORM_IN(v_in, "attn_v", E)
    if (need_ternary(L, NAME("attn_v.weight"), E, kv_dim, &ly->wv))
        return -1;
    if (qk && (!(ly->attn_q_norm = need_norm(L, NAME("attn_q_norm.weight"), D)) ||
               !(ly->attn_k_norm = need_norm(L, NAME("attn_k_norm.weight"), D))))
        return -1;
    if (sub && !(ly->attn_sub_norm = need_norm(L, NAME("attn_sub_norm.weight"), q_dim)))
        return -1;
    NORM_IN(o_in, "attn_output", q_dim)
    if (need_ternary(L, NAME("attn_output.weight"), q_dim, E, &ly->wo))
        return -1;
    if (!(ly->ffn_norm = need_norm(L, NAME("ffn_norm.weight"), E)))
        return -1;
    NORM_IN(gate_in, "ffn_gate", E)
    if (need_ternary(L, NAME("ffn_gate.weight"), E, F, &ly->w_gate))
        return -1;
    NORM_IN(up_in, "ffn_up", E)
    if (need_ternary(L, NAME("ffn_up.weight"), E, F, &ly->w_up))
        return -1;
    if (sub && !(ly->ffn_sub_norm = need_norm(L, NAME("ffn_sub_norm.weight"), F)))
        return -1;
    NORM_IN(down_in, "ffn_down", F)
    if (need_ternary(L, NAME("ffn_down.weight"), F, E, &ly->w_down))
        return -1;
#undef NORM_IN
#undef NAME
    return 0;
}

static int load_vocab(loader *L)
{
    bn_hparams *hp = &L->m->hp;
    const bn_gguf_tensor *emb = bn_gguf_tensor_find(L->m->file, "token_embd.weight");
    if (!emb)
        return lfail(L, "missing tensor 'token_embd.weight'");
    if (emb->ne[1] > INT32_MAX)
        return lfail(L, "tensor 'token_embd.weight' has %llu rows, too many",
                     (unsigned long long)emb->ne[1]);
    hp->n_vocab = (int32_t)emb->ne[1];
    /* the Q2_0 graph's token_embd and head may be Q2_0 or F16 (model-format §10.6.3); every
     * graph's may be Q8_0 (§10.1.6), whose blocks the reader checked to fit */
    const int q2 = L->a->weight_format == BN_WFMT_Q2_0;
    if (q2 && emb->type == BN_TYPE_Q2_0) {
        if (need_q2_0(L, "token_embd.weight", hp->n_embd, hp->n_vocab, &L->m->tok_embd_q2))
            return -1;
    } else if (emb->type == BN_TYPE_Q8_0) {
        if (!need_tensor(L, "token_embd.weight", BN_TYPE_Q8_0, hp->n_embd, hp->n_vocab))
            return -1;
        L->m->tok_embd_q8 = emb->data;
    } else {
        if (!need_tensor(L, "token_embd.weight", BN_TYPE_F16, hp->n_embd, hp->n_vocab))
            return -1;
        L->m->tok_embd = (const uint16_t *)(const void *)emb->data;
    }

    int32_t vocab_size = 0;
    int r = arch_int(L, "vocab_size", 0, &vocab_size);
    if (r < 0)
        return -1;
    if (r == 0 && vocab_size != hp->n_vocab)
        return lfail(L, "%s.vocab_size %d differs from the %d rows of token_embd.weight", L->arch,
                     vocab_size, hp->n_vocab);
    int64_t ti = bn_meta_find(L->m, "tokenizer.ggml.tokens");
    if (ti >= 0) {
        int et;
        uint64_t count;
        if (bn_meta_array(L->m, ti, &et, &count, NULL) != 0 || et != BN_GGUF_STRING)
            return lfail(L, "key 'tokenizer.ggml.tokens' is not an array of strings");
        if (count != (uint64_t)hp->n_vocab)
            return lfail(L,
                         "key 'tokenizer.ggml.tokens' has %llu entries, but token_embd.weight "
                         "has %d rows",
                         (unsigned long long)count, hp->n_vocab);
    }

    const bn_gguf_tensor *out = bn_gguf_tensor_find(L->m->file, "output.weight");
    if (out) {
        if (q2 && out->type == BN_TYPE_Q2_0) {
            if (need_q2_0(L, "output.weight", hp->n_embd, hp->n_vocab, &L->m->head_q2))
                return -1;
        } else if (out->type == BN_TYPE_Q8_0) {
            if (!need_tensor(L, "output.weight", BN_TYPE_Q8_0, hp->n_embd, hp->n_vocab))
                return -1;
            L->m->head_q8 = out->data;
        } else {
            if (!need_tensor(L, "output.weight", BN_TYPE_F16, hp->n_embd, hp->n_vocab))
                return -1;
            L->m->head = (const uint16_t *)(const void *)out->data;
        }
        hp->tied_head = 0;
    } else {
        L->m->head = L->m->tok_embd;
        L->m->head_q2 = L->m->tok_embd_q2;
        L->m->head_q8 = L->m->tok_embd_q8;
        hp->tied_head = 1;
    }
    return 0;
}

/* ---- public API ---- */

bn_model *bn_model_load(const char *path, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    bn_model *m = calloc(1, sizeof *m);
    if (!m) {
        bn_set_err(err, errlen, "out of memory");
        return NULL;
    }
    loader L = {.m = m, .err = err, .errlen = errlen};
    m->file = bn_gguf_open(path, err, errlen);
    if (!m->file)
        goto fail;
    if (read_architecture(&L) || read_hparams(&L) || load_vocab(&L))
        goto fail;

    bn_hparams *hp = &m->hp;
    /* Each layer has a fixed number of tensors (11 for BitNet): a block_count the file
     * cannot back is rejected before the layer array is allocated. */
    const int32_t per_layer = bn_arch_layer_tensors(m->arch);
    if (first_layer_complete(&L))
        goto fail;
    if ((uint64_t)hp->n_layer > bn_gguf_tensor_count(m->file) / (uint64_t)per_layer) {
        lfail(&L, "%s.block_count %d needs %lld tensors, the file has %llu", L.arch, hp->n_layer,
              (long long)per_layer * hp->n_layer,
              (unsigned long long)bn_gguf_tensor_count(m->file));
        goto fail;
    }
    if (bn_gguf_tensor_find(m->file, "rope_freqs.weight")) {
        lfail(&L, "tensor 'rope_freqs.weight' (RoPE frequency factors) is not supported");
        goto fail;
    }
    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (m->arch->norms_f16) {
        /* every norm of the graph, plus output_norm */
        m->cap_norm_copies = (size_t)hp->n_layer * (size_t)per_layer + 1;
        m->norm_copies = calloc(m->cap_norm_copies, sizeof *m->norm_copies);
    }
    if (!m->layers || (m->arch->norms_f16 && !m->norm_copies)) {
        lfail(&L, "out of memory");
        goto fail;
    }
    for (int32_t il = 0; il < hp->n_layer; il++)
        if (load_layer(&L, il, &m->layers[il]))
            goto fail;
    if (!(m->output_norm = need_norm(&L, "output_norm.weight", hp->n_embd)))
        goto fail;

    hp->file_size = bn_gguf_file_size(m->file);
    hp->n_params = 0;
    for (uint64_t i = 0; i < bn_gguf_tensor_count(m->file); i++) {
        const bn_gguf_tensor *t = bn_gguf_tensor_at(m->file, i);
        hp->n_params += t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3]; /* each < 2^60 */
    }
    return m;
fail:
    bn_model_free(m);
    return NULL;
}

void bn_model_free(bn_model *m)
{
    if (!m)
        return;
    free(m->layers);
    for (size_t i = 0; i < m->n_norm_copies; i++)
        free(m->norm_copies[i]);
    free(m->norm_copies);
    for (size_t i = 0; i < m->n_repacked; i++)
        free(m->repacked[i]);
    free(m->repacked);
    bn_gguf_close(m->file);
    free(m);
}

void bn_model_hparams(const bn_model *m, bn_hparams *out)
{
    if (m && out)
        *out = m->hp;
}
