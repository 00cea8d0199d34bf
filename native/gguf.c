/* gguf.c - a validating GGUF v3 reader over mmap (model-format §1) and the bn_meta_* API.
 *
 * The file is untrusted: every count, length, type, shape and offset is checked against the
 * mapping's size (and against overflow) before it is used, so a malformed file yields an
 * error message naming the key or tensor at fault, never a read outside the mapping.
 * Parsing walks the header once; string arrays get an offset index so that
 * bn_meta_array_str is O(1) (the Llama-3 vocabulary has 128256 tokens and 280147 merges).
 */
#define _POSIX_C_SOURCE 200809L

#include "error.h"
#include "gguf.h"
#include "mapguard.h"
#include "model.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_NAME 64u      /* GGUF spec: tensor names are at most 64 bytes */
#define GGUF_MAX_KEY 65535u    /* GGUF spec: keys are at most 65535 bytes */
#define GGUF_MAX_ARRAY_DEPTH 8 /* nested arrays are legal; bound the recursion */

/* ---- parsed structures ---- */

typedef struct {
    const char *key; /* not NUL-terminated */
    size_t key_len;
    uint32_t type;      /* BN_GGUF_* */
    uint64_t value_off; /* file offset of the value (for arrays: of the first element) */
    uint32_t elem_type; /* arrays only */
    uint64_t count;     /* arrays only */
    uint64_t *str_offs; /* string arrays only: file offset of each element's length */
} gguf_kv;

/* Open-addressing hash table of indices into an array of names. */
typedef struct {
    uint64_t *slots; /* index + 1; 0 = empty */
    uint64_t mask;
} name_index;

struct bn_gguf {
    const uint8_t *base; /* the read-only mapping */
    uint64_t size;
    gguf_kv *kv;
    uint64_t n_kv;
    bn_gguf_tensor *tensors;
    uint64_t n_tensors;
    name_index kv_index;
    name_index tensor_index;
    uint64_t alignment;
    uint64_t data_off; /* start of the data section */
};

/* ---- errors ---- */

/* A file-supplied name made safe to print: printable ASCII only, cut at 80 bytes. */
static int q2_0_room(bn_gguf *g, uint64_t data_size, char *err, size_t errlen);

static void printable(char *out, size_t outlen, const char *s, size_t len)
{
    size_t j = 0;
    for (size_t i = 0; i < len && j + 4 < outlen; i++) {
        if (j >= 80) {
            out[j++] = '.';
            out[j++] = '.';
            out[j++] = '.';
            break;
        }
        unsigned char c = (unsigned char)s[i];
        out[j++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
    }
    out[j] = '\0';
}

static const char *value_type_name(uint32_t t)
{
    static const char *names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                  "bool", "string", "array", "u64", "i64", "f64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "unknown";
}

static const char *ggml_type_name(uint32_t t)
{
    switch (t) {
    case 0: return "F32";
    case 1: return "F16";
    case 2: return "Q4_0";
    case 3: return "Q4_1";
    case 6: return "Q5_0";
    case 7: return "Q5_1";
    case 8: return "Q8_0";
    case 9: return "Q8_1";
    case 10: return "Q2_K";
    case 11: return "Q3_K";
    case 12: return "Q4_K";
    case 13: return "Q5_K";
    case 14: return "Q6_K";
    case 15: return "Q8_K";
    case 24: return "I8";
    case 25: return "I16";
    case 26: return "I32";
    case 27: return "I64";
    case 28: return "F64";
    case 30: return "BF16";
    case 36: return "I2_S";
    case 42: return "Q2_0";
    default: return "unknown";
    }
}

/* ---- bounded little-endian reader ---- */

typedef struct {
    const uint8_t *base;
    uint64_t size;
    uint64_t pos;
    char ctx[192]; /* what is being read, for error messages: "key 'x'", "tensor #3" */
    char *err;
    size_t errlen;
} reader;

static int fail(reader *r, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    bn_vset_err(msg, sizeof msg, fmt, ap);
    va_end(ap);
    bn_set_err(r->err, r->errlen, "%s: %s", r->ctx, msg);
    return -1;
}

static uint64_t remaining(const reader *r)
{
    return r->size - r->pos;
}

static int need(reader *r, uint64_t n, const char *what)
{
    if (n > remaining(r))
        return fail(r, "truncated file: %s needs %llu bytes at offset %llu, only %llu left", what,
                    (unsigned long long)n, (unsigned long long)r->pos,
                    (unsigned long long)remaining(r));
    return 0;
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p)
{
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

static int read_u32(reader *r, uint32_t *out, const char *what)
{
    if (need(r, 4, what))
        return -1;
    *out = le32(r->base + r->pos);
    r->pos += 4;
    return 0;
}

static int read_u64(reader *r, uint64_t *out, const char *what)
{
    if (need(r, 8, what))
        return -1;
    *out = le64(r->base + r->pos);
    r->pos += 8;
    return 0;
}

/* A GGUF string: u64 length + bytes. Returns the bytes in place. */
static int read_str(reader *r, const char **s, uint64_t *len, const char *what)
{
    /* defined on failure too: GCC -O3 cannot always tell that callers then stop */
    *s = NULL;
    *len = 0;
    if (read_u64(r, len, what))
        return -1;
    if (*len > remaining(r))
        return fail(r,
                    "truncated file: %s length %llu at offset %llu runs past the end "
                    "(%llu bytes left)",
                    what, (unsigned long long)*len, (unsigned long long)(r->pos - 8),
                    (unsigned long long)remaining(r));
    *s = (const char *)(r->base + r->pos);
    r->pos += *len;
    return 0;
}

/* Size of a fixed-size value type, 0 for string/array/unknown. */
static uint64_t scalar_size(uint32_t t)
{
    switch (t) {
    case BN_GGUF_U8:
    case BN_GGUF_I8:
    case BN_GGUF_BOOL: return 1;
    case BN_GGUF_U16:
    case BN_GGUF_I16: return 2;
    case BN_GGUF_U32:
    case BN_GGUF_I32:
    case BN_GGUF_F32: return 4;
    case BN_GGUF_U64:
    case BN_GGUF_I64:
    case BN_GGUF_F64: return 8;
    default: return 0;
    }
}

/* Smallest encoding of one element of type t (used to bound array counts by the file size). */
static uint64_t min_value_size(uint32_t t)
{
    if (t == BN_GGUF_STRING)
        return 8;
    if (t == BN_GGUF_ARRAY)
        return 12;
    return scalar_size(t);
}

static int check_bools(reader *r, uint64_t count)
{
    for (uint64_t i = 0; i < count; i++) {
        uint8_t b = r->base[r->pos + i];
        if (b > 1)
            return count == 1
                       ? fail(r, "bool value %u is not 0 or 1", b)
                       : fail(r, "bool element %llu is %u, not 0 or 1", (unsigned long long)i, b);
    }
    return 0;
}

static int skip_value(reader *r, uint32_t type, int depth);

/* An array body after its element type and count. */
static int skip_array_elems(reader *r, uint32_t elem_type, uint64_t count, int depth)
{
    uint64_t min = min_value_size(elem_type);
    if (min == 0)
        return fail(r, "unknown array element type %u", elem_type);
    if (count > remaining(r) / min)
        return fail(r,
                    "truncated file: array of %llu %s elements needs at least %llu bytes per "
                    "element, only %llu bytes left",
                    (unsigned long long)count, value_type_name(elem_type), (unsigned long long)min,
                    (unsigned long long)remaining(r));
    uint64_t sz = scalar_size(elem_type);
    if (sz) {
        if (elem_type == BN_GGUF_BOOL && check_bools(r, count))
            return -1;
        r->pos += count * sz;
        return 0;
    }
    for (uint64_t i = 0; i < count; i++)
        if (skip_value(r, elem_type, depth))
            return -1;
    return 0;
}

static int skip_value(reader *r, uint32_t type, int depth)
{
    uint64_t sz = scalar_size(type);
    if (sz) {
        if (need(r, sz, "value"))
            return -1;
        if (type == BN_GGUF_BOOL && check_bools(r, 1))
            return -1;
        r->pos += sz;
        return 0;
    }
    if (type == BN_GGUF_STRING) {
        const char *s;
        uint64_t len;
        return read_str(r, &s, &len, "string");
    }
    if (type == BN_GGUF_ARRAY) {
        if (depth >= GGUF_MAX_ARRAY_DEPTH)
            return fail(r, "arrays nested deeper than %d levels", GGUF_MAX_ARRAY_DEPTH);
        uint32_t et;
        uint64_t count;
        if (read_u32(r, &et, "array element type") || read_u64(r, &count, "array count"))
            return -1;
        return skip_array_elems(r, et, count, depth + 1);
    }
    return fail(r, "unknown value type %u", type);
}

/* ---- name hash tables ---- */

static uint64_t hash_name(const char *s, size_t len)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static int index_init(name_index *ix, uint64_t n)
{
    uint64_t cap = 16;
    while (cap < 2 * n)
        cap *= 2; /* n is bounded by the file size, so this terminates */
    ix->slots = calloc(cap, sizeof *ix->slots);
    ix->mask = cap - 1;
    return ix->slots ? 0 : -1;
}

typedef struct {
    const char *(*name)(const void *items, uint64_t i, size_t *len);
    const void *items;
} name_source;

static const char *kv_name(const void *items, uint64_t i, size_t *len)
{
    const gguf_kv *kv = (const gguf_kv *)items + i;
    *len = kv->key_len;
    return kv->key;
}

static const char *tensor_name(const void *items, uint64_t i, size_t *len)
{
    const bn_gguf_tensor *t = (const bn_gguf_tensor *)items + i;
    *len = t->name_len;
    return t->name;
}

/* Index of name, or UINT64_MAX. */
static uint64_t index_find(const name_index *ix, name_source src, const char *s, size_t len)
{
    if (!ix->slots)
        return UINT64_MAX;
    for (uint64_t h = hash_name(s, len) & ix->mask;; h = (h + 1) & ix->mask) {
        uint64_t v = ix->slots[h];
        if (v == 0)
            return UINT64_MAX;
        size_t l;
        const char *n = src.name(src.items, v - 1, &l);
        if (l == len && memcmp(n, s, len) == 0)
            return v - 1;
    }
}

/* Insert item i; returns the index of an existing item with the same name, or UINT64_MAX. */
static uint64_t index_insert(name_index *ix, name_source src, uint64_t i)
{
    size_t len;
    const char *s = src.name(src.items, i, &len);
    uint64_t h = hash_name(s, len) & ix->mask;
    for (;; h = (h + 1) & ix->mask) {
        uint64_t v = ix->slots[h];
        if (v == 0)
            break;
        size_t l;
        const char *n = src.name(src.items, v - 1, &l);
        if (l == len && memcmp(n, s, len) == 0)
            return v - 1;
    }
    ix->slots[h] = i + 1;
    return UINT64_MAX;
}

/* ---- header parsing ---- */

/* Grow a dynamic array so that it holds at least n+1 items. Arrays grow with what was
 * actually parsed, never with an untrusted count. */
static int grow(void **items, uint64_t *cap, uint64_t n, size_t item_size)
{
    if (n < *cap)
        return 0;
    uint64_t nc = *cap ? *cap * 2 : 64;
    void *p = realloc(*items, (size_t)nc * item_size);
    if (!p)
        return -1;
    memset((char *)p + (size_t)*cap * item_size, 0, (size_t)(nc - *cap) * item_size);
    *items = p;
    *cap = nc;
    return 0;
}

static int parse_kv(reader *r, bn_gguf *g, uint64_t i)
{
    gguf_kv *kv = &g->kv[i];
    snprintf(r->ctx, sizeof r->ctx, "key #%llu", (unsigned long long)i);
    const char *key;
    uint64_t key_len;
    if (read_str(r, &key, &key_len, "key"))
        return -1;
    if (key_len == 0)
        return fail(r, "empty key");
    if (key_len > GGUF_MAX_KEY)
        return fail(r, "key length %llu exceeds %u", (unsigned long long)key_len, GGUF_MAX_KEY);
    kv->key = key;
    kv->key_len = (size_t)key_len;
    char name[96];
    printable(name, sizeof name, key, kv->key_len);
    snprintf(r->ctx, sizeof r->ctx, "key '%s'", name);
    if (read_u32(r, &kv->type, "value type"))
        return -1;
    if (kv->type == BN_GGUF_ARRAY) {
        if (read_u32(r, &kv->elem_type, "array element type") ||
            read_u64(r, &kv->count, "array count"))
            return -1;
        kv->value_off = r->pos;
        if (skip_array_elems(r, kv->elem_type, kv->count, 1))
            return -1;
        if (kv->elem_type == BN_GGUF_STRING && kv->count > 0) {
            /* Second walk over the already validated strings to index them. */
            kv->str_offs = malloc((size_t)kv->count * sizeof *kv->str_offs);
            if (!kv->str_offs)
                return fail(r, "out of memory indexing %llu strings",
                            (unsigned long long)kv->count);
            uint64_t off = kv->value_off;
            for (uint64_t j = 0; j < kv->count; j++) {
                kv->str_offs[j] = off;
                off += 8 + le64(g->base + off);
            }
        }
        return 0;
    }
    kv->value_off = r->pos;
    return skip_value(r, kv->type, 0);
}

/* Bytes of tensor data for n elements of type t, or -1 with a message. */
static int tensor_nbytes(reader *r, const bn_gguf_tensor *t, uint64_t n, uint64_t *out)
{
    switch (t->type) {
    case BN_TYPE_F32: *out = n * 4; return 0; /* n < 2^60: no overflow */
    case BN_TYPE_F16: *out = n * 2; return 0;
    case BN_TYPE_I2_S:
        if (t->ne[0] % 128 != 0)
            return fail(r, "I2_S tensor ne[0] = %llu is not a multiple of 128",
                        (unsigned long long)t->ne[0]);
        *out = n / 4 + 32; /* codes, then the f32 scale and 28 padding bytes */
        return 0;
    case BN_TYPE_Q8_0: /* model-format §1.3: 34-byte blocks of 32 weights along ne[0] */
        if (t->ne[0] % 32 != 0)
            return fail(r, "Q8_0 tensor ne[0] = %llu is not a multiple of 32",
                        (unsigned long long)t->ne[0]);
        *out = n / 32 * 34;
        return 0;
    case 42: /* Q2_0, model-format §10.6.1: 18-byte blocks of 64 weights along ne[0] */
        if (t->ne[0] % 64 != 0)
            return fail(r, "Q2_0 tensor ne[0] = %llu is not a multiple of 64",
                        (unsigned long long)t->ne[0]);
        *out = n / 64 * 18;
        return 0;
    default:
        return fail(r,
                    "unsupported tensor type %u (%s); only F32 (0), F16 (1), Q8_0 (8), I2_S "
                    "(36) and Q2_0 (42)",
                    t->type, ggml_type_name(t->type));
    }
}

static int parse_tensor_info(reader *r, bn_gguf *g, uint64_t i)
{
    bn_gguf_tensor *t = &g->tensors[i];
    snprintf(r->ctx, sizeof r->ctx, "tensor #%llu", (unsigned long long)i);
    const char *name;
    uint64_t name_len;
    if (read_str(r, &name, &name_len, "tensor name"))
        return -1;
    if (name_len == 0)
        return fail(r, "empty tensor name");
    if (name_len > GGUF_MAX_NAME)
        return fail(r, "tensor name length %llu exceeds %u", (unsigned long long)name_len,
                    GGUF_MAX_NAME);
    t->name = name;
    t->name_len = (size_t)name_len;
    char pname[96];
    printable(pname, sizeof pname, name, t->name_len);
    snprintf(r->ctx, sizeof r->ctx, "tensor '%s'", pname);
    if (read_u32(r, &t->n_dims, "n_dims"))
        return -1;
    if (t->n_dims < 1 || t->n_dims > 4)
        return fail(r, "n_dims %u is not in 1..4", t->n_dims);
    uint64_t n = 1;
    for (uint32_t d = 0; d < 4; d++)
        t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (read_u64(r, &t->ne[d], "dimension"))
            return -1;
        if (t->ne[d] == 0)
            return fail(r, "dimension ne[%u] is zero", d);
        /* Element counts stay below 2^60 so byte sizes cannot overflow. */
        if (t->ne[d] >= (1ull << 60) / n)
            return fail(r, "shape overflows: ne[%u] = %llu makes the element count too large", d,
                        (unsigned long long)t->ne[d]);
        n *= t->ne[d];
    }
    if (read_u32(r, &t->type, "type"))
        return -1;
    if (read_u64(r, &t->offset, "offset"))
        return -1;
    t->q2_0_g128 = 0; /* decided by q2_0_room once every offset is known */
    return tensor_nbytes(r, t, n, &t->nbytes);
}

static void gguf_free_parsed(bn_gguf *g)
{
    if (g->kv)
        for (uint64_t i = 0; i < g->n_kv; i++)
            free(g->kv[i].str_offs);
    free(g->kv);
    free(g->tensors);
    free(g->kv_index.slots);
    free(g->tensor_index.slots);
}

static int parse(bn_gguf *g, char *err, size_t errlen)
{
    reader r = {.base = g->base, .size = g->size, .pos = 0, .err = err, .errlen = errlen};
    snprintf(r.ctx, sizeof r.ctx, "header");
    if (g->size < 4 || memcmp(g->base, "GGUF", 4) != 0) {
        if (g->size < 4)
            return fail(&r, "truncated file: %llu bytes, no GGUF magic",
                        (unsigned long long)g->size);
        return fail(&r, "bad magic 0x%02x%02x%02x%02x, not a GGUF file (expected 'GGUF')",
                    g->base[0], g->base[1], g->base[2], g->base[3]);
    }
    r.pos = 4;
    uint32_t version;
    if (read_u32(&r, &version, "version"))
        return -1;
    if (version != 3) {
        if (version == 0x03000000u)
            return fail(&r, "unsupported version: this is a big-endian GGUF file");
        return fail(&r, "unsupported GGUF version %u (only version 3)", version);
    }
    uint64_t n_tensors, n_kv;
    if (read_u64(&r, &n_tensors, "tensor count") || read_u64(&r, &n_kv, "kv count"))
        return -1;
    /* A key/value needs >= 13 bytes, a tensor info >= 32: bound counts by the file size. */
    if (n_kv > remaining(&r) / 13)
        return fail(&r, "kv count %llu cannot fit in the %llu bytes left (truncated or corrupt)",
                    (unsigned long long)n_kv, (unsigned long long)remaining(&r));
    if (n_tensors > remaining(&r) / 32)
        return fail(&r,
                    "tensor count %llu cannot fit in the %llu bytes left (truncated or "
                    "corrupt)",
                    (unsigned long long)n_tensors, (unsigned long long)remaining(&r));

    uint64_t cap = 0;
    for (uint64_t i = 0; i < n_kv; i++) {
        if (grow((void **)&g->kv, &cap, i, sizeof *g->kv))
            return fail(&r, "out of memory");
        g->n_kv = i + 1;
        if (parse_kv(&r, g, i))
            return -1;
    }
    name_source kvs = {kv_name, g->kv};
    if (index_init(&g->kv_index, g->n_kv)) {
        bn_set_err(err, errlen, "out of memory");
        return -1;
    }
    for (uint64_t i = 0; i < g->n_kv; i++) {
        if (index_insert(&g->kv_index, kvs, i) != UINT64_MAX) {
            char name[96];
            printable(name, sizeof name, g->kv[i].key, g->kv[i].key_len);
            bn_set_err(err, errlen, "duplicate key '%s'", name);
            return -1;
        }
    }

    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    uint64_t ai = index_find(&g->kv_index, kvs, "general.alignment", 17);
    if (ai != UINT64_MAX) {
        const gguf_kv *kv = &g->kv[ai];
        if (kv->type != BN_GGUF_U32) {
            bn_set_err(err, errlen, "key 'general.alignment' has type %s, expected u32",
                       value_type_name(kv->type));
            return -1;
        }
        uint32_t a = le32(g->base + kv->value_off);
        if (a == 0 || (a & (a - 1)) != 0) {
            bn_set_err(err, errlen, "key 'general.alignment' = %u is not a power of two", a);
            return -1;
        }
        g->alignment = a;
    }

    cap = 0;
    for (uint64_t i = 0; i < n_tensors; i++) {
        if (grow((void **)&g->tensors, &cap, i, sizeof *g->tensors))
            return fail(&r, "out of memory");
        g->n_tensors = i + 1;
        if (parse_tensor_info(&r, g, i))
            return -1;
    }
    name_source ts = {tensor_name, g->tensors};
    if (index_init(&g->tensor_index, g->n_tensors)) {
        bn_set_err(err, errlen, "out of memory");
        return -1;
    }
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        if (index_insert(&g->tensor_index, ts, i) != UINT64_MAX) {
            char name[96];
            printable(name, sizeof name, g->tensors[i].name, g->tensors[i].name_len);
            bn_set_err(err, errlen, "duplicate tensor name '%s'", name);
            return -1;
        }
    }

    /* The data section starts at the next multiple of the alignment (pos < 2^63: no overflow). */
    uint64_t data_off = (r.pos + g->alignment - 1) / g->alignment * g->alignment;
    if (data_off > g->size) {
        if (g->n_tensors > 0) {
            snprintf(r.ctx, sizeof r.ctx, "data section");
            return fail(&r,
                        "truncated file: data section would start at offset %llu, past the "
                        "end of the %llu-byte file",
                        (unsigned long long)data_off, (unsigned long long)g->size);
        }
        data_off = g->size;
    }
    g->data_off = data_off;
    uint64_t data_size = g->size - data_off;
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        bn_gguf_tensor *t = &g->tensors[i];
        char name[96];
        printable(name, sizeof name, t->name, t->name_len);
        if (t->offset % g->alignment != 0) {
            bn_set_err(err, errlen,
                       "tensor '%s': offset %llu is not a multiple of the alignment %llu", name,
                       (unsigned long long)t->offset, (unsigned long long)g->alignment);
            return -1;
        }
        /* type 42's size depends on its layout: q2_0_room checks it against its room */
        if (t->offset > data_size || (t->type != 42 && t->nbytes > data_size - t->offset)) {
            bn_set_err(err, errlen,
                       "tensor '%s': %s data at offset %llu, %llu bytes, lies outside the "
                       "file (data section holds %llu bytes; truncated file?)",
                       name, ggml_type_name(t->type), (unsigned long long)t->offset,
                       (unsigned long long)t->nbytes, (unsigned long long)data_size);
            return -1;
        }
        t->data = g->base + data_off + t->offset;
    }
    return q2_0_room(g, data_size, err, errlen);
}

/* Type 42 has two layouts (model-format §10.6.1): mainline Q2_0, 18-byte blocks of 64
 * weights, and PrismML's, 34-byte blocks of 128 (the files its model cards list). Nothing in
 * the header tells them apart; the tensor offsets do. A tensor's room is the distance to the
 * next larger tensor offset (or the end of the data section), and a writer starts the next
 * tensor at the first aligned offset after the data. So a tensor whose room is too small for
 * its g64 data but exactly its g128 data padded to the alignment marks a g128 file; every
 * type-42 tensor of that file must then have exactly that room (a file mixing both layouts
 * is refused, naming a tensor), and in a g64 file every one must fit its g64 data. */
static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* The room of tensor t: the bytes up to the next larger offset in sorted offs[n], else up to
 * the end of the data section. */
static uint64_t tensor_room(const bn_gguf_tensor *t, const uint64_t *offs, size_t n,
                            uint64_t data_size)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (offs[mid] <= t->offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (lo < n ? offs[lo] : data_size) - t->offset;
}

/* Bytes of t's data in the g128 layout; 0 when its rows are not whole 128-weight blocks. */
static uint64_t g128_nbytes(const bn_gguf_tensor *t)
{
    if (t->ne[0] % 128 != 0)
        return 0;
    return t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3] / 128 * 34;
}

static int g128_exact(const bn_gguf *g, const bn_gguf_tensor *t, uint64_t room)
{
    const uint64_t n = g128_nbytes(t);
    return n > 0 && n <= room && room < n + g->alignment;
}

static int q2_0_room(bn_gguf *g, uint64_t data_size, char *err, size_t errlen)
{
    uint64_t n42 = 0;
    for (uint64_t i = 0; i < g->n_tensors; i++)
        n42 += g->tensors[i].type == 42;
    if (n42 == 0)
        return 0;
    const size_t n = (size_t)g->n_tensors;
    uint64_t *offs = malloc(n * sizeof *offs);
    if (!offs) {
        bn_set_err(err, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++)
        offs[i] = g->tensors[i].offset;
    qsort(offs, n, sizeof *offs, cmp_u64);

    const bn_gguf_tensor *marker = NULL; /* a tensor that only the g128 layout explains */
    for (size_t i = 0; i < n && !marker; i++) {
        const bn_gguf_tensor *t = &g->tensors[i];
        const uint64_t room = tensor_room(t, offs, n, data_size);
        if (t->type == 42 && t->nbytes > room && g128_exact(g, t, room))
            marker = t;
    }
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        bn_gguf_tensor *t = &g->tensors[i];
        if (t->type != 42)
            continue;
        const uint64_t room = tensor_room(t, offs, n, data_size);
        char name[96];
        printable(name, sizeof name, t->name, t->name_len);
        if (marker && g128_exact(g, t, room)) {
            t->q2_0_g128 = 1;
            t->nbytes = g128_nbytes(t);
        } else if (marker) {
            char other[96];
            printable(other, sizeof other, marker->name, marker->name_len);
            bn_set_err(err, errlen,
                       "tensor '%s': type 42 data of %llu bytes is not in PrismML's layout "
                       "(34-byte blocks of 128 weights: %llu bytes) that '%s' has; a file "
                       "must use one layout of type 42",
                       name, (unsigned long long)room, (unsigned long long)g128_nbytes(t), other);
            rc = -1;
        } else if (t->nbytes > room) {
            bn_set_err(err, errlen,
                       "tensor '%s': Q2_0 data of %llu bytes overlaps the next tensor (room "
                       "for %llu bytes)",
                       name, (unsigned long long)t->nbytes, (unsigned long long)room);
            rc = -1;
        }
    }
    free(offs);
    return rc;
}

/* ---- public reader API ---- */

bn_gguf *bn_gguf_open(const char *path, char *err, size_t errlen)
{
    if (!path) {
        bn_set_err(err, errlen, "no model path given");
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        bn_set_err(err, errlen, "cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        bn_set_err(err, errlen, "cannot stat '%s': %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(st.st_mode)) {
        bn_set_err(err, errlen, "'%s' is not a regular file", path);
        close(fd);
        return NULL;
    }
    if (st.st_size < 24) {
        bn_set_err(err, errlen, "truncated file: '%s' has %lld bytes, less than a GGUF header",
                   path, (long long)st.st_size);
        close(fd);
        return NULL;
    }
    if ((uint64_t)st.st_size > (uint64_t)SIZE_MAX) {
        bn_set_err(err, errlen, "'%s' is too large to map", path);
        close(fd);
        return NULL;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd); /* the mapping keeps the file */
    if (map == MAP_FAILED) {
        bn_set_err(err, errlen, "cannot mmap '%s': %s", path, strerror(errno));
        return NULL;
    }
    bn_gguf *g = calloc(1, sizeof *g);
    if (!g) {
        munmap(map, (size_t)st.st_size);
        bn_set_err(err, errlen, "out of memory");
        return NULL;
    }
    g->base = map;
    g->size = (uint64_t)st.st_size;
    if (parse(g, err, errlen) != 0) {
        bn_gguf_close(g);
        return NULL;
    }
    bn_mapguard_add(g->base, (size_t)g->size, path);
    return g;
}

void bn_gguf_close(bn_gguf *g)
{
    if (!g)
        return;
    gguf_free_parsed(g);
    if (g->base) {
        bn_mapguard_remove(g->base);
        munmap((void *)g->base, (size_t)g->size);
    }
    free(g);
}

uint64_t bn_gguf_file_size(const bn_gguf *g)
{
    return g ? g->size : 0;
}

const bn_gguf_tensor *bn_gguf_tensor_find(const bn_gguf *g, const char *name)
{
    if (!g || !name)
        return NULL;
    name_source ts = {tensor_name, g->tensors};
    uint64_t i = index_find(&g->tensor_index, ts, name, strlen(name));
    return i == UINT64_MAX ? NULL : &g->tensors[i];
}

uint64_t bn_gguf_tensor_count(const bn_gguf *g)
{
    return g ? g->n_tensors : 0;
}

const bn_gguf_tensor *bn_gguf_tensor_at(const bn_gguf *g, uint64_t i)
{
    return g && i < g->n_tensors ? &g->tensors[i] : NULL;
}

/* ---- metadata API (bitnet.h) ---- */

static const gguf_kv *kv_at(const bn_model *m, int64_t idx)
{
    if (!m || !m->file || idx < 0 || (uint64_t)idx >= m->file->n_kv)
        return NULL;
    return &m->file->kv[idx];
}

int64_t bn_meta_count(const bn_model *m)
{
    return m && m->file ? (int64_t)m->file->n_kv : 0;
}

int64_t bn_meta_find(const bn_model *m, const char *key)
{
    if (!m || !m->file || !key)
        return -1;
    name_source kvs = {kv_name, m->file->kv};
    uint64_t i = index_find(&m->file->kv_index, kvs, key, strlen(key));
    return i == UINT64_MAX ? -1 : (int64_t)i;
}

const char *bn_meta_key(const bn_model *m, int64_t idx, size_t *len)
{
    const gguf_kv *kv = kv_at(m, idx);
    if (!kv)
        return NULL;
    if (len)
        *len = kv->key_len;
    return kv->key;
}

int bn_meta_type(const bn_model *m, int64_t idx)
{
    const gguf_kv *kv = kv_at(m, idx);
    return kv ? (int)kv->type : -1;
}

int bn_meta_get_i64(const bn_model *m, int64_t idx, int64_t *out)
{
    const gguf_kv *kv = kv_at(m, idx);
    if (!kv || !out)
        return -1;
    const uint8_t *p = m->file->base + kv->value_off;
    switch (kv->type) {
    case BN_GGUF_U8:
    case BN_GGUF_BOOL: *out = p[0]; return 0;
    case BN_GGUF_I8: *out = (int8_t)p[0]; return 0;
    case BN_GGUF_U16: *out = (uint16_t)(p[0] | p[1] << 8); return 0;
    case BN_GGUF_I16: *out = (int16_t)(uint16_t)(p[0] | p[1] << 8); return 0;
    case BN_GGUF_U32: *out = le32(p); return 0;
    case BN_GGUF_I32: *out = (int32_t)le32(p); return 0;
    case BN_GGUF_U64: {
        uint64_t v = le64(p);
        if (v > (uint64_t)INT64_MAX)
            return -1;
        *out = (int64_t)v;
        return 0;
    }
    case BN_GGUF_I64: {
        uint64_t v = le64(p);
        memcpy(out, &v, sizeof v); /* two's complement reinterpretation without UB */
        return 0;
    }
    default: return -1;
    }
}

int bn_meta_get_f64(const bn_model *m, int64_t idx, double *out)
{
    const gguf_kv *kv = kv_at(m, idx);
    if (!kv || !out)
        return -1;
    const uint8_t *p = m->file->base + kv->value_off;
    if (kv->type == BN_GGUF_F32) {
        uint32_t b = le32(p);
        float f;
        memcpy(&f, &b, sizeof f);
        *out = f;
        return 0;
    }
    if (kv->type == BN_GGUF_F64) {
        uint64_t b = le64(p);
        memcpy(out, &b, sizeof *out);
        return 0;
    }
    return -1;
}

const char *bn_meta_get_str(const bn_model *m, int64_t idx, size_t *len)
{
    const gguf_kv *kv = kv_at(m, idx);
    if (!kv || kv->type != BN_GGUF_STRING)
        return NULL;
    const uint8_t *p = m->file->base + kv->value_off;
    if (len)
        *len = (size_t)le64(p);
    return (const char *)(p + 8);
}

int bn_meta_array(const bn_model *m, int64_t idx, int *elem_type, uint64_t *count,
                  const void **data)
{
    const gguf_kv *kv = kv_at(m, idx);
    if (!kv || kv->type != BN_GGUF_ARRAY)
        return -1;
    if (elem_type)
        *elem_type = (int)kv->elem_type;
    if (count)
        *count = kv->count;
    if (data)
        *data = m->file->base + kv->value_off;
    return 0;
}

const char *bn_meta_array_str(const bn_model *m, int64_t idx, uint64_t i, size_t *len)
{
    const gguf_kv *kv = kv_at(m, idx);
    if (!kv || kv->type != BN_GGUF_ARRAY || kv->elem_type != BN_GGUF_STRING || i >= kv->count)
        return NULL;
    const uint8_t *p = m->file->base + kv->str_offs[i];
    if (len)
        *len = (size_t)le64(p);
    return (const char *)(p + 8);
}
