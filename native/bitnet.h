/* bitnet.h - the whole public API of the bitnetd-trio BitNet b1.58 engine (C11).
 *
 * Nothing here knows Python. Every function that can fail returns 0 on success or a
 * negative value on failure and, when given an error buffer, writes a NUL-terminated
 * message into it that names the offending key/tensor and what is wrong.
 *
 * Threading: a bn_model is immutable after loading and may be shared by contexts.
 * A bn_context is used by one thread at a time (the daemon's inference thread); it
 * runs its own worker pool inside bn_forward. bn_cancel_* may be called from any thread.
 */
#ifndef BITNET_H
#define BITNET_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- GGUF value types (model-format §1) ---- */
enum {
    BN_GGUF_U8 = 0,
    BN_GGUF_I8 = 1,
    BN_GGUF_U16 = 2,
    BN_GGUF_I16 = 3,
    BN_GGUF_U32 = 4,
    BN_GGUF_I32 = 5,
    BN_GGUF_F32 = 6,
    BN_GGUF_BOOL = 7,
    BN_GGUF_STRING = 8,
    BN_GGUF_ARRAY = 9,
    BN_GGUF_U64 = 10,
    BN_GGUF_I64 = 11,
    BN_GGUF_F64 = 12
};

/* ---- model ---- */
typedef struct bn_model bn_model;

/* RoPE scaling (model-format §5.2.3.1): ARCH.rope.scaling.type and its keys. */
enum { BN_ROPE_SCALING_NONE = 0, BN_ROPE_SCALING_LINEAR = 1, BN_ROPE_SCALING_YARN = 2 };

typedef struct {
    int32_t type;      /* BN_ROPE_SCALING_* */
    float factor;      /* rope.scaling.factor: angles divided by it (1 for none) */
    int32_t orig_ctx;  /* yarn: rope.scaling.original_context_length (0 otherwise) */
    float beta_fast;   /* yarn: rope.scaling.yarn_beta_fast, 32 when absent */
    float beta_slow;   /* yarn: rope.scaling.yarn_beta_slow, 1 when absent */
    float attn_factor; /* rope.scaling.attn_factor, 1 when absent: multiplies cos and sin */
} bn_rope_scaling;

typedef struct {
    char architecture[32]; /* "bitnet-b1.58", "bitnet-25", "llama" or "qwen3" (§10.2) */
    int32_t n_vocab;       /* rows of token_embd */
    int32_t n_ctx_train;   /* ARCH.context_length */
    int32_t n_embd;        /* E */
    int32_t n_layer;
    int32_t n_ff;      /* F */
    int32_t n_head;    /* H */
    int32_t n_head_kv; /* Hkv; n_head % n_head_kv == 0 */
    int32_t head_dim;  /* D: E / H for BitNet; from the keys otherwise (model-format §10.1.4) */
    float rms_eps;
    float rope_base;
    int32_t tied_head; /* 1 when the head is token_embd, 0 when output.weight exists */
    uint64_t n_params; /* number of weights in all tensors */
    uint64_t file_size;
    int32_t pooling; /* the pooling the graph is defined with, numbered as ARCH.pooling_type:
                      * 3 (last token) for the BitNet embedding graph, 0 for a decoder
                      * (model-format §10.5.4) */
    bn_rope_scaling rope_scaling;
} bn_hparams;

/* Load a GGUF v3 BitNet b1.58 file with mmap. Returns NULL on error (message in err).
 * While the model is loaded, a change of the file in place that makes a read of the mapping
 * fail (SIGBUS) ends the process with one line naming the file, written to standard error and
 * to the bn_set_fatal_log descriptor, and exit status BN_MAPGUARD_EXIT. */
bn_model *bn_model_load(const char *path, char *err, size_t errlen);
void bn_model_free(bn_model *m);

enum { BN_MAPGUARD_EXIT = 75 }; /* EX_TEMPFAIL: a service manager restarts the daemon */

/* One more descriptor for that last line (a log file, or a datagram socket connected to
 * syslog), each line starting with `prefix` (e.g. "<26>bitnetd[42]: "); -1: none. */
void bn_set_fatal_log(int fd, const char *prefix);
void bn_model_hparams(const bn_model *m, bn_hparams *out);

/* ---- metadata (values point into the mapping; valid until bn_model_free) ---- */
int64_t bn_meta_count(const bn_model *m);
int64_t bn_meta_find(const bn_model *m, const char *key); /* index, or -1 */
const char *bn_meta_key(const bn_model *m, int64_t idx, size_t *len);
int bn_meta_type(const bn_model *m, int64_t idx); /* BN_GGUF_*, -1 if bad idx */
/* Scalars. Integer and bool types read through get_i64 (u64 above INT64_MAX fails),
 * F32/F64 through get_f64. Strings are not NUL-terminated: use len. */
int bn_meta_get_i64(const bn_model *m, int64_t idx, int64_t *out);
int bn_meta_get_f64(const bn_model *m, int64_t idx, double *out);
const char *bn_meta_get_str(const bn_model *m, int64_t idx, size_t *len);
/* Arrays: element type and count; for numeric element types *data points at the packed
 * little-endian elements (may be unaligned: copy with memcpy). */
int bn_meta_array(const bn_model *m, int64_t idx, int *elem_type, uint64_t *count,
                  const void **data);
const char *bn_meta_array_str(const bn_model *m, int64_t idx, uint64_t i, size_t *len);

/* ---- cancellation: an atomic flag owned by the caller, settable from any thread ---- */
typedef struct bn_cancel bn_cancel;
bn_cancel *bn_cancel_new(void);
void bn_cancel_free(bn_cancel *c);
void bn_cancel_set(bn_cancel *c);
void bn_cancel_clear(bn_cancel *c);
int bn_cancel_is_set(const bn_cancel *c);

/* ---- context: N sequence slots, each with its own KV cache and position ---- */
typedef struct bn_context bn_context;

bn_context *bn_context_new(const bn_model *m, int32_t n_slots, int32_t n_ctx, int32_t n_threads,
                           char *err, size_t errlen);
void bn_context_free(bn_context *ctx);
int bn_context_set_threads(bn_context *ctx, int32_t n_threads);
int32_t bn_context_n_ctx(const bn_context *ctx);
int32_t bn_context_n_slots(const bn_context *ctx);
/* Forget a slot's tokens (position back to 0). */
void bn_seq_reset(bn_context *ctx, int32_t slot);
/* Drop the slot's cache from position pos on (keep a common prefix). */
int bn_seq_truncate(bn_context *ctx, int32_t slot, int32_t pos);
int32_t bn_seq_pos(const bn_context *ctx, int32_t slot);

/* An entry's output (bn_batch_entry.logits): logits of no token, the last or every token; or,
 * instead of logits, the final-norm hidden state y of model-format §5.3 (the head's input,
 * n_embd floats, model-format §5.3.1) of the last or of every token. */
enum {
    BN_LOGITS_NONE = 0,
    BN_LOGITS_LAST = 1,
    BN_LOGITS_ALL = 2,
    BN_HIDDEN_LAST = 3,
    BN_HIDDEN_ALL = 4
};

/* One sequence's share of a forward step: n_tokens tokens appended at the slot's position
 * (1 for a decode step, more for a prefill chunk). */
typedef struct {
    int32_t slot;
    int32_t n_tokens;
    const int32_t *tokens;
    int32_t logits;    /* BN_LOGITS_* or BN_HIDDEN_* */
    bn_cancel *cancel; /* may be NULL; a set flag skips the entry (status = 1) */
    int32_t status;    /* out: 0 done, 1 cancelled, <0 error */
} bn_batch_entry;

/* Advance every entry's sequence together: each weight row is read once for all tokens
 * of all entries. Distinct slots only. Returns 0, or <0 with a message (bad slot, token id
 * out of range, context full); on error nothing is applied, the offending entry's status is
 * -1 and every other entry's -2. Long calls run in internal chunks of up to 512 tokens; an
 * entry whose cancel flag is set before its first or between chunks is skipped (status 1)
 * and its slot keeps the position it had before the call. A sequence's logits are
 * bit-identical whatever else is in the call, however its tokens are split into calls, and
 * whatever the thread count. */
int bn_forward(bn_context *ctx, bn_batch_entry *entries, int32_t n_entries, char *err,
               size_t errlen);
/* Logits of the last bn_forward: entry e, token t (t must be n_tokens-1 for
 * BN_LOGITS_LAST). Returns NULL if not computed. n_vocab floats. */
const float *bn_logits(const bn_context *ctx, int32_t entry, int32_t t);
/* Hidden state y (model-format §5.3.1) of the last bn_forward: entry e, token t (t must be
 * n_tokens-1 for BN_HIDDEN_LAST). Returns NULL if not computed. n_embd floats, bit-identical
 * whatever else is in the call, however the tokens are split into calls, and whatever the
 * thread count. */
const float *bn_hidden(const bn_context *ctx, int32_t entry, int32_t t);

/* ---- log-probabilities ---- */
/* log-softmax of logits[0..n) at `token`; optionally the top_n best (ids, logprobs),
 * sorted best first, ties by lower id. Returns logprob of token. */
float bn_logprobs(const float *logits, int32_t n, int32_t token, int32_t top_n, int32_t *top_ids,
                  float *top_lps);

/* ---- sampling ---- */
typedef struct {
    float temperature;       /* 0 = greedy */
    int32_t top_k;           /* <= 0: off */
    float top_p;             /* 1: off */
    float min_p;             /* 0: off */
    float repeat_penalty;    /* 1: off (llama.cpp style, divides positive logits) */
    int32_t repeat_last_n;   /* window for penalties; -1 = whole history */
    float presence_penalty;  /* 0: off */
    float frequency_penalty; /* 0: off */
    uint64_t seed;
} bn_sampling;

typedef struct bn_sampler bn_sampler;
bn_sampler *bn_sampler_new(const bn_sampling *p, int32_t n_vocab);
void bn_sampler_free(bn_sampler *s);
int bn_sampler_set_bias(bn_sampler *s, int32_t token, float bias); /* -INFINITY bans */
void bn_sampler_accept(bn_sampler *s, int32_t token);              /* add to penalty history */
/* Pick a token from logits (not modified). Deterministic given seed and history. */
int32_t bn_sampler_sample(bn_sampler *s, const float *logits);
/* The same, with only the tokens whose bit is set in `allowed` (n_words uint32 words, bit
 * i % 32 of word i / 32; tokens past the last word are not allowed) as candidates: constrained
 * decoding. allowed == NULL is bn_sampler_sample. Returns -1 when no allowed token is left. */
int32_t bn_sampler_sample_masked(bn_sampler *s, const float *logits, const uint32_t *allowed,
                                 int32_t n_words);
/* bn_sampler_sample_masked, also reporting the distribution the token was drawn from: after the
 * whole chain (bias, penalties, top-k, top-p, min-p, temperature), renormalised over the tokens
 * that survived it (llama.cpp's post_sampling_probs). *prob gets the drawn token's probability;
 * top_ids / top_probs (top_n entries each, either may be NULL when top_n is 0) the top_n most
 * likely survivors, best first, and *n_top how many there are (<= top_n; the other entries get
 * id -1 and probability 0). Greedy (temperature 0) reports the chosen token alone, with 1.
 * Draws the same token with the same PRNG use as bn_sampler_sample_masked. prob and n_top may
 * be NULL. Returns the token, or -1 as bn_sampler_sample_masked does or for top_n < 0 or
 * missing arrays (nothing reported then). */
int32_t bn_sampler_sample_probs(bn_sampler *s, const float *logits, const uint32_t *allowed,
                                int32_t n_words, int32_t top_n, int32_t *top_ids, float *top_probs,
                                float *prob, int32_t *n_top);

/* ---- kernels (exposed for tests and benchmarks) ---- */
/* y[t][r] = BitLinear(x[t], W) for t < n_tok, r < n_out: x is n_tok x n_in floats, y is
 * n_tok x n_out, W is n_out rows of n_in/4 bytes of I2_S codes (n_in % 128 == 0, n_in <=
 * 2^22) with per-tensor scale. kernel: a name of bn_kernel_select, or NULL for the dispatched
 * one. Returns 0, or -1 for bad arguments or out of memory. */
int bn_ternary_matmul(const char *kernel, const uint8_t *packed, float scale, int32_t n_in,
                      int32_t n_out, const float *x, int32_t n_tok, float *y, int32_t n_threads);
/* The same for a Q2_0 matrix (model-format §10.6): n_out rows of n_in/64 18-byte blocks
 * (n_in % 64 == 0, n_in <= 2^22), activations quantized per token as for I2_S. */
int bn_q2_0_matmul(const char *kernel, const uint8_t *blocks, int32_t n_in, int32_t n_out,
                   const float *x, int32_t n_tok, float *y, int32_t n_threads);
/* y[t][r] = the Q8_0 head product (model-format §5.3, §10.1.6) of float x[t] (not quantized)
 * with row r of a Q8_0 matrix: n_out rows of n_in/32 34-byte blocks (n_in % 32 == 0, n_in <=
 * 2^20), in the order every kernel set reproduces bit for bit. */
int bn_q8_0_matmul(const char *kernel, const uint8_t *blocks, int32_t n_in, int32_t n_out,
                   const float *x, int32_t n_tok, float *y, int32_t n_threads);

/* Memory read bandwidth in GB/s: the best of reps passes of n_threads threads, each reading
 * its share of an n_bytes buffer as `streams` interleaved sequential streams. <= 0 on failure.
 * For benchmarks (model-format §9). */
double bn_measure_read_bandwidth(uint64_t n_bytes, int32_t n_threads, int32_t streams,
                                 int32_t reps);
/* The same probe with its buffer and threads kept, so that single passes can be interleaved
 * with other measurements. */
typedef struct bn_bwprobe bn_bwprobe;
bn_bwprobe *bn_bwprobe_new(uint64_t n_bytes, int32_t n_threads); /* NULL on failure */
double bn_bwprobe_run(bn_bwprobe *p, int32_t streams);           /* one pass, GB/s */
void bn_bwprobe_free(bn_bwprobe *p);

/* ---- test-only: the forward pass's per-token steps and their plain references ----
 * Not for applications. bn_test_* run the engine's own code (forward.c) on caller-given
 * arrays, bn_ref_* plain loops written from model-format §5.2 (reference.c); tests check
 * that both give the same bits. Each returns 0, or -1 for bad arguments or out of memory. */
/* out[0..n) = RMSNorm(x, w) (model-format §5.2.1). */
int bn_test_rmsnorm(const float *x, const float *w, int32_t n, float eps, float *out);
int bn_ref_rmsnorm(const float *x, const float *w, int32_t n, float eps, float *out);
/* RoPE in place on v[n_heads][head_dim] at position pos with NeoX pairing (model-format
 * §5.2.3), or adjacent pairing when adjacent != 0 (§10.4.1); scaling NULL: none, else the
 * angles and magnitude of §5.2.3.1 (fields as the loader checks them). */
int bn_test_rope(float *v, int32_t n_heads, int32_t head_dim, int32_t pos, float base,
                 const bn_rope_scaling *scaling, int32_t adjacent);
int bn_ref_rope(float *v, int32_t n_heads, int32_t head_dim, int32_t pos, float base,
                const bn_rope_scaling *scaling, int32_t adjacent);
/* Causal attention of one token at position n_pos - 1 (model-format §5.2.5):
 * q[n_head][head_dim], k and v [n_pos][n_head_kv][head_dim], out[n_head][head_dim];
 * n_head % n_head_kv == 0 (and n_head / n_head_kv <= 64 for bn_test_attention). */
int bn_test_attention(const float *q, const float *k, const float *v, int32_t n_pos, int32_t n_head,
                      int32_t n_head_kv, int32_t head_dim, float *out);
int bn_ref_attention(const float *q, const float *k, const float *v, int32_t n_pos, int32_t n_head,
                     int32_t n_head_kv, int32_t head_dim, float *out);

/* ---- introspection ---- */
/* "scalar", "avx2", "avx512vnni", "amx": the kernel set chosen at run time. */
const char *bn_kernel_name(void);
/* Force a kernel set ("scalar", "avx2", "avx512vnni", "amx"); returns 0, or -1 if not supported
 * here. Every set computes bit-identical results. */
int bn_kernel_select(const char *name);

#ifdef __cplusplus
}
#endif
#endif
