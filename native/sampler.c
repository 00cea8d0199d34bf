/* sampler.c - token sampling and log-probabilities (model-format §7).
 *
 * The chain, in llama.cpp's order: logit bias, repetition penalty, presence and frequency
 * penalties, then greedy (temperature <= 0) or top-k, top-p, min-p, temperature, softmax and
 * a draw from the sampler's own PRNG. top-p and min-p look at the distribution at temperature
 * 1, as llama.cpp's do; temperature only reshapes what they kept.
 *
 * Determinism: a sampler's result depends only on its parameters, its seed, the tokens it has
 * accepted, the samples it has drawn so far and the logits it is given. Every candidate order
 * is a total order (logit, then lower id), and a non-greedy sample consumes exactly one PRNG
 * output.
 *
 * Non-finite logits never reach arithmetic that could misbehave: NaN counts as -inf (the token
 * can never be picked) and +inf as FLT_MAX (the largest finite value).
 */
#include "bitnet.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ---- candidates: a logit with its token id, ordered by logit then lower id ---- */

typedef struct {
    float logit;
    int32_t id;
} bn_cand;

/* a ranks strictly below b: smaller logit, or equal logit and higher id. */
static int cand_worse(const bn_cand *a, const bn_cand *b)
{
    return a->logit < b->logit || (a->logit == b->logit && a->id > b->id);
}

static float finite_or_clamped(float x)
{
    if (isnan(x))
        return -INFINITY;
    if (x == INFINITY)
        return FLT_MAX;
    return x;
}

/* Min-heap on "worse" (root = worst kept candidate) over h[0..n). */
static void heap_sift_down(bn_cand *h, int32_t n, int32_t i)
{
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && cand_worse(&h[l], &h[w]))
            w = l;
        if (r < n && cand_worse(&h[r], &h[w]))
            w = r;
        if (w == i)
            return;
        bn_cand t = h[i];
        h[i] = h[w];
        h[w] = t;
        i = w;
    }
}

/* Heap sort of a worst-at-root heap of k candidates: pop the worst to the back, so the
 * front ends up best first. */
static void sort_heap_best_first(bn_cand *c, int32_t k)
{
    for (int32_t end = k - 1; end > 0; end--) {
        bn_cand t = c[0];
        c[0] = c[end];
        c[end] = t;
        heap_sift_down(c, end, 0);
    }
}

/* Rearrange c[0..n) so that c[0..k) holds the k best candidates sorted best first.
 * In place, O(n log k): a heap of the k best so far sits at the front of the array and
 * every later element either bounces off its root or replaces it. */
static void select_best_sorted(bn_cand *c, int32_t n, int32_t k)
{
    if (k > n)
        k = n;
    if (k <= 0)
        return;
    for (int32_t i = k / 2 - 1; i >= 0; i--)
        heap_sift_down(c, k, i);
    for (int32_t i = k; i < n; i++) {
        if (cand_worse(&c[0], &c[i])) {
            bn_cand t = c[0];
            c[0] = c[i];
            c[i] = t;
            heap_sift_down(c, k, 0);
        }
    }
    sort_heap_best_first(c, k);
}

/* ---- PRNG: xoshiro256** (Blackman & Vigna), state seeded with splitmix64 ---- */

static uint64_t splitmix64_next(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t xoshiro_next(uint64_t s[4])
{
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

/* Uniform double in [0, 1) from the top 53 bits. */
static double xoshiro_uniform(uint64_t s[4])
{
    return (double)(xoshiro_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- the sampler ---- */

/* Windows longer than this are kept as "the whole history": no sequence gets that long, and a
 * huge repeat_last_n must not allocate a huge ring. */
#define BN_MAX_RING 262144

typedef struct {
    int32_t token;
    float bias;
} bn_bias;

struct bn_sampler {
    bn_sampling p;
    int32_t n_vocab;
    float *work;     /* [n_vocab] scratch: the caller's logits after bias and penalties,
                      * then the final candidates' softmax weights */
    bn_cand *cand;   /* [n_vocab] scratch: the candidates still in the running, with ids */
    bn_bias *biases; /* [n_biases] logit_bias entries, one per token */
    int32_t n_biases, cap_biases;
    int penalties_on; /* any of the three penalties active, with a non-empty window */
    int32_t *counts;  /* [n_vocab] occurrences of each token in the window (if penalties_on) */
    int32_t *ring;    /* [ring_cap] the window (oldest at ring_head), if it is finite */
    int32_t ring_cap, ring_len, ring_head;
    int32_t *seen; /* [n_vocab] distinct tokens seen, when the window is the whole history */
    int32_t n_seen;
    uint64_t rng[4]; /* xoshiro256** state */
};

bn_sampler *bn_sampler_new(const bn_sampling *p, int32_t n_vocab)
{
    if (p == NULL || n_vocab <= 0)
        return NULL;
    bn_sampler *s = calloc(1, sizeof *s);
    if (s == NULL)
        return NULL;
    s->p = *p;
    s->n_vocab = n_vocab;
    s->work = malloc((size_t)n_vocab * sizeof *s->work);
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    if (s->work == NULL || s->cand == NULL)
        goto fail;

    float rp = p->repeat_penalty, pp = p->presence_penalty, fp = p->frequency_penalty;
    int rep_on = isfinite(rp) && rp > 0.0f && rp != 1.0f;
    int pres_on = isfinite(pp) && pp != 0.0f;
    int freq_on = isfinite(fp) && fp != 0.0f;
    if (!rep_on)
        s->p.repeat_penalty = 1.0f;
    if (!pres_on)
        s->p.presence_penalty = 0.0f;
    if (!freq_on)
        s->p.frequency_penalty = 0.0f;
    s->penalties_on = (rep_on || pres_on || freq_on) && p->repeat_last_n != 0;
    if (s->penalties_on) {
        s->counts = calloc((size_t)n_vocab, sizeof *s->counts);
        if (s->counts == NULL)
            goto fail;
        if (p->repeat_last_n > 0 && p->repeat_last_n <= BN_MAX_RING) {
            s->ring_cap = p->repeat_last_n;
            s->ring = malloc((size_t)s->ring_cap * sizeof *s->ring);
            if (s->ring == NULL)
                goto fail;
        } else {
            s->seen = malloc((size_t)n_vocab * sizeof *s->seen);
            if (s->seen == NULL)
                goto fail;
        }
    }

    uint64_t x = p->seed;
    for (int i = 0; i < 4; i++)
        s->rng[i] = splitmix64_next(&x);
    return s;
fail:
    bn_sampler_free(s);
    return NULL;
}

void bn_sampler_free(bn_sampler *s)
{
    if (s == NULL)
        return;
    free(s->work);
    free(s->cand);
    free(s->biases);
    free(s->counts);
    free(s->ring);
    free(s->seen);
    free(s);
}

int bn_sampler_set_bias(bn_sampler *s, int32_t token, float bias)
{
    if (s == NULL || token < 0 || token >= s->n_vocab || isnan(bias))
        return -1;
    for (int32_t i = 0; i < s->n_biases; i++) {
        if (s->biases[i].token == token) {
            s->biases[i].bias = bias;
            return 0;
        }
    }
    if (s->n_biases == s->cap_biases) {
        int32_t cap = s->cap_biases ? 2 * s->cap_biases : 16;
        bn_bias *nb = realloc(s->biases, (size_t)cap * sizeof *nb);
        if (nb == NULL)
            return -1;
        s->biases = nb;
        s->cap_biases = cap;
    }
    s->biases[s->n_biases].token = token;
    s->biases[s->n_biases].bias = bias;
    s->n_biases++;
    return 0;
}

void bn_sampler_accept(bn_sampler *s, int32_t token)
{
    if (s == NULL || !s->penalties_on || token < 0 || token >= s->n_vocab)
        return;
    if (s->ring != NULL) {
        if (s->ring_len == s->ring_cap) {
            /* The window is full: the oldest token leaves it. */
            s->counts[s->ring[s->ring_head]]--;
            s->ring[s->ring_head] = token;
            s->ring_head = (s->ring_head + 1) % s->ring_cap;
        } else {
            s->ring[(s->ring_head + s->ring_len) % s->ring_cap] = token;
            s->ring_len++;
        }
    } else if (s->counts[token] == 0) {
        s->seen[s->n_seen++] = token;
    } else if (s->counts[token] == INT32_MAX) {
        return; /* saturate rather than overflow (only reachable with a whole-history window) */
    }
    s->counts[token]++;
}

/* Penalize one token that occurs `count` (> 0) times in the window. */
static void penalize(const bn_sampling *p, float *logit, int32_t count)
{
    float l = *logit;
    if (l == -INFINITY)
        return;
    /* llama.cpp's repetition penalty: shrink toward "less likely" whatever the sign. */
    l = l > 0.0f ? l / p->repeat_penalty : l * p->repeat_penalty;
    /* OpenAI's presence and frequency penalties. */
    l -= (float)count * p->frequency_penalty + p->presence_penalty;
    *logit = finite_or_clamped(l);
}

static void apply_penalties(bn_sampler *s)
{
    float *w = s->work;
    if (s->ring != NULL) {
        /* Each distinct token once: negate its count as a visited mark, then restore. */
        for (int32_t i = 0; i < s->ring_len; i++) {
            int32_t t = s->ring[(s->ring_head + i) % s->ring_cap];
            if (s->counts[t] > 0) {
                penalize(&s->p, &w[t], s->counts[t]);
                s->counts[t] = -s->counts[t];
            }
        }
        for (int32_t i = 0; i < s->ring_len; i++) {
            int32_t t = s->ring[(s->ring_head + i) % s->ring_cap];
            if (s->counts[t] < 0)
                s->counts[t] = -s->counts[t];
        }
    } else {
        for (int32_t i = 0; i < s->n_seen; i++) {
            int32_t t = s->seen[i];
            penalize(&s->p, &w[t], s->counts[t]);
        }
    }
}

/* The k best of w[0..n) into c[0..k) sorted best first; returns how many are possible
 * (fewer than k when the rest are -inf). One pass; almost every element only meets the
 * heap's root. */
static int32_t top_k_from_work(const float *w, int32_t n, int32_t k, bn_cand *c)
{
    if (k > n)
        k = n;
    for (int32_t i = 0; i < k; i++) {
        c[i].logit = w[i];
        c[i].id = i;
    }
    for (int32_t i = k / 2 - 1; i >= 0; i--)
        heap_sift_down(c, k, i);
    for (int32_t i = k; i < n; i++) {
        /* i is a higher id than anything in the heap: it must be strictly better. */
        if (w[i] > c[0].logit) {
            c[0].logit = w[i];
            c[0].id = i;
            heap_sift_down(c, k, 0);
        }
    }
    sort_heap_best_first(c, k);
    while (k > 0 && c[k - 1].logit == -INFINITY)
        k--;
    return k;
}

/* Length of the shortest best-first prefix of c[0..n) (sorted) whose mass, starting from
 * `cum`, reaches `target`, weights exp(logit - mx); n if it never does (rounding). */
static int32_t top_p_prefix(const bn_cand *c, int32_t n, float mx, double cum, double target)
{
    for (int32_t i = 0; i < n; i++) {
        cum += (double)expf(c[i].logit - mx);
        if (cum >= target)
            return i + 1;
    }
    return n;
}

/* Nucleus buckets by distance below the best logit: NB-1 buckets over [0, DMAX), then the
 * tail. Finding the nucleus then needs one histogram pass and a sort of one bucket only. */
#define NUCLEUS_NB 1024
#define NUCLEUS_DMAX 32.0

static int nucleus_bucket(float l, float mx)
{
    double d = (double)mx - (double)l;
    if (!(d < NUCLEUS_DMAX))
        return NUCLEUS_NB - 1;
    return (int)(d * ((NUCLEUS_NB - 1) / NUCLEUS_DMAX));
}

/* top-p over the unsorted candidates c[0..n): keeps the nucleus (best tokens, in the total
 * order, until their mass reaches top_p of the whole) at the front, in no particular order.
 * Returns its size. */
static int32_t nucleus_unsorted(bn_cand *c, int32_t n, float mx, double top_p)
{
    double mass[NUCLEUS_NB];
    memset(mass, 0, sizeof mass);
    double z = 0.0;
    for (int32_t i = 0; i < n; i++) {
        double e = (double)expf(c[i].logit - mx);
        mass[nucleus_bucket(c[i].logit, mx)] += e;
        z += e;
    }
    double target = top_p * z, cum = 0.0;
    int b = 0;
    while (b < NUCLEUS_NB - 1 && cum + mass[b] < target)
        cum += mass[b++];
    /* Buckets before b are kept whole; bucket b is sorted and cut. Partition in place. */
    int32_t keep = 0;
    for (int32_t i = 0; i < n; i++) {
        if (nucleus_bucket(c[i].logit, mx) < b) {
            bn_cand t = c[keep];
            c[keep++] = c[i];
            c[i] = t;
        }
    }
    int32_t nb = 0;
    for (int32_t i = keep; i < n; i++) {
        if (nucleus_bucket(c[i].logit, mx) == b) {
            bn_cand t = c[keep + nb];
            c[keep + nb++] = c[i];
            c[i] = t;
        }
    }
    select_best_sorted(c + keep, nb, nb);
    return keep + top_p_prefix(c + keep, nb, mx, cum, target);
}

/* What bn_sampler_sample_probs asks to be told besides the token (NULL: nothing). */
typedef struct {
    int32_t top_n;
    int32_t *top_ids;
    float *top_probs;
    float prob;
    int32_t n_top;
} bn_report;

static int32_t sample_chain(bn_sampler *s, const float *logits, const uint32_t *allowed,
                            int32_t n_words, bn_report *r);

int32_t bn_sampler_sample(bn_sampler *s, const float *logits)
{
    return sample_chain(s, logits, NULL, 0, NULL);
}

int32_t bn_sampler_sample_masked(bn_sampler *s, const float *logits, const uint32_t *allowed,
                                 int32_t n_words)
{
    return sample_chain(s, logits, allowed, n_words, NULL);
}

int32_t bn_sampler_sample_probs(bn_sampler *s, const float *logits, const uint32_t *allowed,
                                int32_t n_words, int32_t top_n, int32_t *top_ids, float *top_probs,
                                float *prob, int32_t *n_top)
{
    if (top_n < 0 || (top_n > 0 && (top_ids == NULL || top_probs == NULL)))
        return -1;
    for (int32_t i = 0; i < top_n; i++) {
        top_ids[i] = -1;
        top_probs[i] = 0.0f;
    }
    bn_report r = {top_n, top_ids, top_probs, 0.0f, 0};
    int32_t tok = sample_chain(s, logits, allowed, n_words, &r);
    if (prob != NULL)
        *prob = tok < 0 ? 0.0f : r.prob;
    if (n_top != NULL)
        *n_top = tok < 0 ? 0 : r.n_top;
    return tok;
}

/* The report of a non-greedy draw: candidate `chosen` of c[0..n) was drawn, each candidate's
 * weight being expf((logit - mx) * inv_t) and z their sum. Runs after the draw, so reordering
 * the candidates cannot change it. */
static void report_draw(bn_report *r, bn_cand *c, int32_t n, int32_t chosen, float mx, float inv_t,
                        double z)
{
    r->prob = (float)((double)expf((c[chosen].logit - mx) * inv_t) / z);
    int32_t k = r->top_n < n ? r->top_n : n;
    select_best_sorted(c, n, k);
    for (int32_t i = 0; i < k; i++) {
        r->top_ids[i] = c[i].id;
        r->top_probs[i] = (float)((double)expf((c[i].logit - mx) * inv_t) / z);
    }
    r->n_top = k;
}

/* The allowed-token bitset of constrained decoding: bit (i % 32) of word i / 32 is token i;
 * a token outside the n_words words is not allowed. Disallowed tokens become -inf before the
 * chain, exactly as a -inf logit bias would (so the chain, and the PRNG draws, are those of
 * the same logits with those tokens banned). */
static int32_t sample_chain(bn_sampler *s, const float *logits, const uint32_t *allowed,
                            int32_t n_words, bn_report *r)
{
    if (s == NULL || logits == NULL || (allowed != NULL && n_words < 0))
        return -1;
    const bn_sampling *p = &s->p;
    int32_t nv = s->n_vocab;
    float *w = s->work;
    bn_cand *c = s->cand;

    for (int32_t i = 0; i < nv; i++) {
        float x = logits[i];
        x = x != x ? -INFINITY : x; /* NaN */
        w[i] = x > FLT_MAX ? FLT_MAX : x;
    }
    if (allowed != NULL) {
        int64_t n_bits = (int64_t)n_words * 32;
        int32_t n_masked = n_bits < nv ? (int32_t)n_bits : nv;
        for (int32_t i = 0; i < n_masked; i++) {
            if (!((allowed[i >> 5] >> (i & 31)) & 1u))
                w[i] = -INFINITY;
        }
        for (int32_t i = n_masked; i < nv; i++)
            w[i] = -INFINITY;
    }
    for (int32_t i = 0; i < s->n_biases; i++) {
        float *l = &w[s->biases[i].token];
        *l = finite_or_clamped(*l + s->biases[i].bias); /* -inf + inf is NaN: banned */
    }
    if (s->penalties_on)
        apply_penalties(s);

    /* Greedy: the best logit, ties to the lowest id. A NaN temperature counts as 0, and so
     * does one so small that 1/T overflows. */
    if (!(p->temperature > 0.0f) || !isfinite(1.0f / p->temperature)) {
        if (top_k_from_work(w, nv, 1, c) != 1)
            return -1; /* every token banned */
        if (r != NULL) {
            /* the chain keeps the best token alone: probability 1 */
            r->prob = 1.0f;
            if (r->top_n > 0) {
                r->top_ids[0] = c[0].id;
                r->top_probs[0] = 1.0f;
                r->n_top = 1;
            }
        }
        return c[0].id;
    }

    /* The candidates c[0..n): sorted best first after top-k, else in id order. */
    int32_t n = 0;
    float mx = -INFINITY;
    int sorted = 0;
    if (p->top_k > 0 && p->top_k < nv) {
        n = top_k_from_work(w, nv, p->top_k, c);
        if (n > 0)
            mx = c[0].logit;
        sorted = 1;
    } else {
        for (int32_t i = 0; i < nv; i++) {
            if (w[i] > -INFINITY) {
                c[n].logit = w[i];
                c[n].id = i;
                if (w[i] > mx)
                    mx = w[i];
                n++;
            }
        }
    }
    if (n == 0)
        return -1;

    /* min-p keeps p_i >= min_p * p_max, i.e. logit_i >= mx + log(min_p): always the best. */
    int use_min_p = p->min_p > 0.0f;
    double cut = use_min_p ? (double)mx + log(p->min_p < 1.0f ? (double)p->min_p : 1.0) : 0.0;
    double top_p = p->top_p > 0.0f ? (double)p->top_p : 0.0;

    if (p->top_p < 1.0f) {
        if (sorted) {
            double z = 0.0;
            for (int32_t i = 0; i < n; i++)
                z += (double)expf(c[i].logit - mx);
            n = top_p_prefix(c, n, mx, 0.0, top_p * z);
        } else if (use_min_p) {
            /* Both are best-first prefixes, so the result is the shorter one: the min-p set S
             * unless the nucleus ends inside S. Only S (usually small) is ever sorted. */
            double z = 0.0, zs = 0.0;
            int32_t k = 0;
            for (int32_t i = 0; i < n; i++) {
                double e = (double)expf(c[i].logit - mx);
                z += e;
                if ((double)c[i].logit >= cut) {
                    zs += e;
                    c[k++] = c[i];
                }
            }
            n = k;
            if (zs >= top_p * z) {
                select_best_sorted(c, n, n);
                n = top_p_prefix(c, n, mx, 0.0, top_p * z);
            }
            use_min_p = 0; /* done */
        } else {
            n = nucleus_unsorted(c, n, mx, top_p);
        }
    }

    if (use_min_p) {
        int32_t k = 0;
        for (int32_t i = 0; i < n; i++) {
            if ((double)c[i].logit >= cut)
                c[k++] = c[i];
            else if (sorted)
                break;
        }
        n = k;
    }

    /* Temperature, softmax and the draw; (l - mx) first so nothing overflows, weights kept
     * in `work` (free by now) so each exp is computed once, sums in double. The best token is
     * always still a candidate, so z >= 1. */
    float inv_t = 1.0f / p->temperature;
    double z = 0.0;
    for (int32_t i = 0; i < n; i++) {
        w[i] = expf((c[i].logit - mx) * inv_t);
        z += (double)w[i];
    }
    double target = xoshiro_uniform(s->rng) * z;
    double cum = 0.0;
    int32_t chosen = n - 1; /* if rounding left target at the very top */
    for (int32_t i = 0; i < n; i++) {
        cum += (double)w[i];
        if (target < cum) {
            chosen = i;
            break;
        }
    }
    int32_t tok = c[chosen].id;
    if (r != NULL)
        report_draw(r, c, n, chosen, mx, inv_t, z);
    return tok;
}

/* ---- log-probabilities ---- */

/* Heap over parallel arrays (value, id); root = worst. Same order as cand_worse. */
static int lp_worse(const float *v, const int32_t *id, int32_t a, int32_t b)
{
    return v[a] < v[b] || (v[a] == v[b] && id[a] > id[b]);
}

static void lp_swap(float *v, int32_t *id, int32_t a, int32_t b)
{
    float tv = v[a];
    v[a] = v[b];
    v[b] = tv;
    int32_t ti = id[a];
    id[a] = id[b];
    id[b] = ti;
}

static void lp_sift_down(float *v, int32_t *id, int32_t n, int32_t i)
{
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && lp_worse(v, id, l, w))
            w = l;
        if (r < n && lp_worse(v, id, r, w))
            w = r;
        if (w == i)
            return;
        lp_swap(v, id, i, w);
        i = w;
    }
}

/* Largest logit, NaN skipped, +inf read as FLT_MAX. Eight running maxima so the loop is not one
 * long dependency chain. */
static float max_logit(const float *l, int32_t n)
{
    float m[8];
    for (int j = 0; j < 8; j++)
        m[j] = -INFINITY;
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++)
            m[j] = l[i + j] > m[j] ? l[i + j] : m[j];
    }
    for (; i < n; i++)
        m[0] = l[i] > m[0] ? l[i] : m[0];
    float mx = m[0];
    for (int j = 1; j < 8; j++)
        mx = m[j] > mx ? m[j] : mx;
    return finite_or_clamped(mx);
}

float bn_logprobs(const float *logits, int32_t n, int32_t token, int32_t top_n, int32_t *top_ids,
                  float *top_lps)
{
    if (logits == NULL || n <= 0)
        return NAN;
    float mx = max_logit(logits, n);
    /* log-sum-exp with the maximum taken out; terms in float (expf is within an ulp), sums in
     * double. (l - mx) cannot overflow: both are finite or l is -inf. */
    double lse = -INFINITY;
    if (mx > -INFINITY) {
        double sum[4] = {0.0, 0.0, 0.0, 0.0};
        int32_t i = 0;
        for (; i + 4 <= n; i += 4) {
            for (int j = 0; j < 4; j++) {
                float l = finite_or_clamped(logits[i + j]);
                sum[j] += (double)expf(l - mx);
            }
        }
        for (; i < n; i++)
            sum[0] += (double)expf(finite_or_clamped(logits[i]) - mx);
        lse = (double)mx + log((sum[0] + sum[1]) + (sum[2] + sum[3]));
    }

    if (top_n > 0 && top_ids != NULL && top_lps != NULL) {
        int32_t k = top_n < n ? top_n : n;
        for (int32_t i = 0; i < k; i++) {
            top_lps[i] = finite_or_clamped(logits[i]);
            top_ids[i] = i;
        }
        for (int32_t i = k / 2 - 1; i >= 0; i--)
            lp_sift_down(top_lps, top_ids, k, i);
        for (int32_t i = k; i < n; i++) {
            float l = finite_or_clamped(logits[i]);
            /* i is a higher id than anything in the heap: it must be strictly better. */
            if (l > top_lps[0]) {
                top_lps[0] = l;
                top_ids[0] = i;
                lp_sift_down(top_lps, top_ids, k, 0);
            }
        }
        for (int32_t end = k - 1; end > 0; end--) {
            lp_swap(top_lps, top_ids, 0, end);
            lp_sift_down(top_lps, top_ids, end, 0);
        }
        for (int32_t i = 0; i < k; i++) {
            top_lps[i] = mx > -INFINITY ? (float)((double)top_lps[i] - lse) : -INFINITY;
        }
        for (int32_t i = k; i < top_n; i++) {
            top_ids[i] = -1;
            top_lps[i] = -INFINITY;
        }
    }

    if (token < 0 || token >= n)
        return NAN;
    if (!(mx > -INFINITY))
        return -INFINITY;
    return (float)((double)finite_or_clamped(logits[token]) - lse);
}
