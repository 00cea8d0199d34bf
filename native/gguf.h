/* gguf.h - internal: a validating GGUF v3 reader over mmap (model-format §1). */
#ifndef BITNET_GGUF_H
#define BITNET_GGUF_H

#include <stddef.h>
#include <stdint.h>

enum { BN_TYPE_F32 = 0, BN_TYPE_F16 = 1, BN_TYPE_Q8_0 = 8, BN_TYPE_I2_S = 36, BN_TYPE_Q2_0 = 42 };

typedef struct {
    const char *name; /* not NUL-terminated; name_len bytes */
    size_t name_len;
    uint32_t n_dims;
    uint64_t ne[4]; /* unused dims are 1 */
    uint32_t type;
    uint64_t offset;     /* relative to the data section, checked */
    uint64_t nbytes;     /* size of the data per the type rules, checked inside the file */
    const uint8_t *data; /* pointer into the mapping */
    /* type 42 in PrismML's layout: 34-byte blocks of 128 weights (model-format §10.6.1);
     * nbytes is then that layout's size, and the loader repacks the data into Q2_0 */
    int q2_0_g128;
} bn_gguf_tensor;

typedef struct bn_gguf bn_gguf;

bn_gguf *bn_gguf_open(const char *path, char *err, size_t errlen);
void bn_gguf_close(bn_gguf *g);
uint64_t bn_gguf_file_size(const bn_gguf *g);
/* Tensors by name: NULL when absent. */
const bn_gguf_tensor *bn_gguf_tensor_find(const bn_gguf *g, const char *name);
uint64_t bn_gguf_tensor_count(const bn_gguf *g);
const bn_gguf_tensor *bn_gguf_tensor_at(const bn_gguf *g, uint64_t i);
/* The bn_meta_* functions of bitnet.h are implemented on top of this reader in gguf.c. */

#endif
