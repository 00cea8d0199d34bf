"""Malformed GGUF files must be refused with a ModelLoadError that says what is wrong.

A valid small model is written with gguf_writer; a small struct-based walk of its header
(independent of the C reader) locates every field of model-format §1, and each field is then
corrupted in turn: absurd counts and lengths, unknown types, zero and huge dimensions, offsets
past the end or unaligned, duplicate names, truncation at every header field and in the data.
Files the writer can express directly (missing keys, wrong hyper-parameters, wrong tensor
shapes or types) are written through its options. Every case names a word its error message
must contain.

The same corpus, plus a seeded mutation fuzz loop, also runs through tests/c/load_harness.c
built with AddressSanitizer and UndefinedBehaviorSanitizer (test_sanitizer_*).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from bitnetd_trio.engine import gguf_writer as gw

ROOT = Path(__file__).resolve().parent.parent
NATIVE = ROOT / "native"
HARNESS = ROOT / "tests" / "c" / "load_harness.c"

#: A valid model as small as the layout allows (fast to write, load and mutate).
MINI = gw.ModelShape(n_vocab=512, n_embd=128, n_head=2, n_head_kv=1, n_ff=128, n_layer=2,
                     n_ctx=64)
ARCH = MINI.architecture
ALIGN = 32

U32, I32, F32, BOOL, STRING, ARRAY, U64 = 4, 5, 6, 7, 8, 9, 10
SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


# ---- an independent walk of the GGUF header ------------------------------------------------


@dataclasses.dataclass
class KV:
    key: str
    key_len_off: int
    type_off: int
    vtype: int
    value_off: int            # for arrays: the element type field
    elem_type: int = -1
    count_off: int = -1
    count: int = 0
    elem_offs: list[int] = dataclasses.field(default_factory=list)   # string arrays


@dataclasses.dataclass
class TensorInfo:
    name: str
    name_len_off: int
    n_dims_off: int
    ne_offs: list[int]
    ne: list[int]
    type_off: int
    ggml_type: int
    offset_off: int
    offset: int


@dataclasses.dataclass
class Header:
    kvs: list[KV]
    tensors: list[TensorInfo]
    end: int                  # end of the last tensor info
    data_start: int
    size: int

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)


def walk_header(data: bytes) -> Header:
    """Locate every field of a valid GGUF v3 file (model-format §1)."""
    assert data[:4] == b"GGUF" and struct.unpack_from("<I", data, 4)[0] == 3
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(at: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", data, at)
        return data[at + 8:at + 8 + n].decode("utf-8"), at + 8 + n

    def skip(vtype: int, at: int) -> int:
        if vtype in SCALAR_SIZE:
            return at + SCALAR_SIZE[vtype]
        if vtype == STRING:
            return string(at)[1]
        assert vtype == ARRAY
        et, count = struct.unpack_from("<IQ", data, at)
        at += 12
        for _ in range(count):
            at = skip(et, at)
        return at

    kvs = []
    for _ in range(n_kv):
        key, p = string(pos)
        (vtype,) = struct.unpack_from("<I", data, p)
        kv = KV(key, pos, p, vtype, p + 4)
        if vtype == ARRAY:
            kv.elem_type, kv.count = struct.unpack_from("<IQ", data, p + 4)
            kv.count_off = p + 8
            at = p + 16
            for _ in range(kv.count):
                if kv.elem_type == STRING:
                    kv.elem_offs.append(at)
                at = skip(kv.elem_type, at)
            pos = at
        else:
            pos = skip(vtype, p + 4)
        kvs.append(kv)
    tensors = []
    for _ in range(n_tensors):
        name, p = string(pos)
        (n_dims,) = struct.unpack_from("<I", data, p)
        ne_offs = [p + 4 + 8 * d for d in range(n_dims)]
        ne = [struct.unpack_from("<Q", data, o)[0] for o in ne_offs]
        type_off = p + 4 + 8 * n_dims
        ggml_type, offset = struct.unpack_from("<IQ", data, type_off)
        tensors.append(TensorInfo(name, pos, p, ne_offs, ne, type_off, ggml_type,
                                  type_off + 4, offset))
        pos = type_off + 12
    data_start = -(-pos // ALIGN) * ALIGN
    return Header(kvs, tensors, pos, data_start, len(data))


# ---- cases ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """A file to load: built from the base model bytes (mutate) or by the writer (write)."""

    id: str
    words: tuple[str, ...]          # all must appear in the error; () = must load
    mutate: Callable[[bytes], bytes] | None = None
    write: Callable[[Path], object] | None = None

    @property
    def valid(self) -> bool:
        return not self.words


def put(fmt: str, off: int, value: float) -> Callable[[bytes], bytes]:
    def f(data: bytes) -> bytes:
        b = bytearray(data)
        struct.pack_into(fmt, b, off, value)
        return bytes(b)
    return f


def put_bytes(off: int, value: bytes) -> Callable[[bytes], bytes]:
    return lambda data: data[:off] + value + data[off + len(value):]


def truncate(n: int) -> Callable[[bytes], bytes]:
    return lambda data: data[:n]


def chain(*fs: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    def f(data: bytes) -> bytes:
        for g in fs:
            data = g(data)
        return data
    return f


def gguf_string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def insert_kv(h: Header, kv: bytes, align: int = ALIGN) -> Callable[[bytes], bytes]:
    """Append one encoded key/value after the last one (bumping kv_count) and re-pad so the
    data section starts aligned again: tensor offsets stay valid."""
    kv_end = h.tensors[0].name_len_off

    def f(data: bytes) -> bytes:
        header = bytearray(data[:kv_end] + kv + data[kv_end:h.end])
        n_kv = struct.unpack_from("<Q", header, 16)[0]
        struct.pack_into("<Q", header, 16, n_kv + 1)
        header += bytes(-len(header) % align)
        return bytes(header) + data[h.data_start:]
    return f


def kv_bytes(key: str, vtype: int, payload: bytes) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + payload


def nested_array(depth: int) -> bytes:
    """An array nested `depth` levels deep around [u32 7]."""
    body = struct.pack("<IQI", U32, 1, 7)
    for _ in range(depth - 1):
        body = struct.pack("<IQ", ARRAY, 1) + body
    return body


@lru_cache(maxsize=1)
def base_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        return gw.write_model(Path(d) / "mini.gguf", MINI, seed=7).read_bytes()


def header_cases(h: Header) -> Iterator[Case]:
    for i, magic in enumerate([b"GGUG", b"ggUF", b"\0\0\0\0", b"GGML", b"GGJT", b"FUGG"]):
        yield Case(f"magic-{i}", ("magic",), put_bytes(0, magic))
    for v in (0, 1, 2, 4, 0x03000000, 0xFFFFFFFF):
        yield Case(f"version-{v:#x}", ("version",), put("<I", 4, v))
    n_t, n_kv = len(h.tensors), len(h.kvs)
    # A key/value takes at least 13 bytes, a tensor info 32.
    for v in (2**63, 2**64 - 1, 2**32, h.size // 32 + 1):
        yield Case(f"tensor-count-{v:#x}", ("tensor count",), put("<Q", 8, v))
    for v in (2**63, 2**64 - 1, 2**32, h.size // 13 + 1):
        yield Case(f"kv-count-{v:#x}", ("kv count",), put("<Q", 16, v))
    # One tensor info too many: the data section's bytes are read as tensor #n_t.
    yield Case("tensor-count-plus-1", (f"tensor #{n_t}",), put("<Q", 8, n_t + 1))
    # One too few: the last tensor is not seen.
    yield Case("tensor-count-minus-1", ("missing tensor", h.tensors[-1].name),
               put("<Q", 8, n_t - 1))
    yield Case("tensor-count-zero", ("missing tensor", "token_embd.weight"), put("<Q", 8, 0))
    # kv count off by one: the parse goes astray; any clear error will do.
    yield Case("kv-count-plus-1", ("tensor",), put("<Q", 16, n_kv + 1))
    yield Case("kv-count-minus-1", ("tensor",), put("<Q", 16, n_kv - 1))
    yield Case("kv-count-zero", ("general.architecture",), put("<Q", 16, 0))


def kv_cases(h: Header) -> Iterator[Case]:
    # Keys the loader reads, with the error the loader must give for a value of wrong type.
    ints = ["context_length", "embedding_length", "block_count", "feed_forward_length",
            "attention.head_count", "attention.head_count_kv", "rope.dimension_count",
            "vocab_size"]
    floats = ["rope.freq_base", "attention.layer_norm_rms_epsilon"]
    for i, kv in enumerate(h.kvs):
        k, klen = kv.key, kv.key_len_off
        yield Case(f"kv{i}-key-len-0", (f"key #{i}", "empty key"), put("<Q", klen, 0))
        for v in (2**63, 2**64 - 1, h.size - klen - 8 + 1):
            yield Case(f"kv{i}-key-len-{v:#x}", (f"key #{i}", "truncated"), put("<Q", klen, v))
        # One byte short: the type is read from the key's last byte (never a valid type).
        yield Case(f"kv{i}-key-len-minus-1", (f"key '{k[:-1]}'", "unknown value type"),
                   put("<Q", klen, len(k.encode()) - 1))
        for t in (13, 0xFFFFFFFF, 0x80000009, 0x100):
            yield Case(f"kv{i}-type-{t:#x}", (f"key '{k}'", "unknown value type"),
                       put("<I", kv.type_off, t))
        # A key renamed (last character changed) is a missing key for the loader.
        renamed = put_bytes(klen + 8 + len(k.encode()) - 1, b"#")
        if k == "general.architecture" or k.startswith(ARCH + ".") and k[len(ARCH) + 1:] in ints[:-1]:
            yield Case(f"kv{i}-renamed", ("missing key", k), renamed)
        if kv.vtype == STRING:
            for v in (2**63, 2**64 - 8, h.size - kv.value_off - 8 + 1):
                yield Case(f"kv{i}-str-len-{v:#x}", (f"key '{k}'", "truncated"),
                           put("<Q", kv.value_off, v))
        if kv.vtype == BOOL:
            for v in (2, 0xFF):
                yield Case(f"kv{i}-bool-{v}", (f"key '{k}'", "bool"),
                           put("<B", kv.value_off, v))
        if kv.vtype == ARRAY:
            for t in (13, 0xFFFFFFFF):
                yield Case(f"kv{i}-elem-type-{t:#x}", (f"key '{k}'", "element type"),
                           put("<I", kv.value_off, t))
            for v in (2**63, 2**64 - 1, 2**40):
                yield Case(f"kv{i}-count-{v:#x}", (f"key '{k}'", "truncated"),
                           put("<Q", kv.count_off, v))
            if kv.elem_type == STRING and kv.elem_offs:
                picks = {0: kv.elem_offs[0], len(kv.elem_offs) // 2:
                         kv.elem_offs[len(kv.elem_offs) // 2], kv.count - 1: kv.elem_offs[-1]}
                for j, off in picks.items():
                    for v in (2**63, 2**40):
                        yield Case(f"kv{i}-elem{j}-len-{v:#x}", (f"key '{k}'", "truncated"),
                                   put("<Q", off, v))
        suffix = k[len(ARCH) + 1:] if k.startswith(ARCH + ".") else None
        if suffix in ints:
            yield Case(f"kv{i}-as-f32", (f"key '{k}'", "type f32"), put("<I", kv.type_off, F32))
            yield Case(f"kv{i}-zero", (f"key '{k}'", "range"), put("<I", kv.value_off, 0))
            yield Case(f"kv{i}-as-i32-negative", (f"key '{k}'", "range"),
                       chain(put("<I", kv.type_off, I32), put("<i", kv.value_off, -5)))
            yield Case(f"kv{i}-u32-huge", (f"key '{k}'", "range"),
                       put("<I", kv.value_off, 0x80000000))
            yield Case(f"kv{i}-as-i32", (), put("<I", kv.type_off, I32))
        if suffix in floats:
            yield Case(f"kv{i}-as-u32", (f"key '{k}'", "type u32"), put("<I", kv.type_off, U32))
            for v in (0.0, -1.0, math.nan, math.inf):
                yield Case(f"kv{i}-value-{v}", (f"key '{k}'", "range"),
                           put("<f", kv.value_off, v))
    # Duplicate keys: rename a key to an earlier one of the same length.
    by_len: dict[int, KV] = {}
    n = 0
    for kv in h.kvs:
        first = by_len.setdefault(len(kv.key.encode()), kv)
        if first is not kv and n < 12:
            n += 1
            yield Case(f"dup-key-{kv.key}", ("duplicate key", first.key),
                       put_bytes(kv.key_len_off + 8, first.key.encode()))
    arch = h.kv("general.architecture")
    yield Case("arch-bitnet-b1.59", ("unsupported architecture", "bitnet-b1.59"),
               put_bytes(arch.value_off + 8, b"bitnet-b1.59"))


def inserted_kv_cases(h: Header) -> Iterator[Case]:
    """Keys spliced into the header (nesting, duplicates, alignment)."""
    def ins(case_id: str, words: tuple[str, ...], kv: bytes, align: int = ALIGN) -> Case:
        return Case(case_id, words, insert_kv(h, kv, align))

    yield ins("nested-array-depth-3", (), kv_bytes("test.nested", ARRAY, nested_array(3)))
    yield ins("nested-array-depth-8", (), kv_bytes("test.nested", ARRAY, nested_array(8)))
    yield ins("nested-array-depth-9", ("test.nested", "nested"),
              kv_bytes("test.nested", ARRAY, nested_array(9)))
    yield ins("nested-array-depth-100", ("test.nested", "nested"),
              kv_bytes("test.nested", ARRAY, nested_array(100)))
    yield ins("nested-array-inner-count-huge", ("test.nested", "truncated"),
              kv_bytes("test.nested", ARRAY, struct.pack("<IQIQ", ARRAY, 1, U32, 2**62)))
    yield ins("nested-array-inner-bad-type", ("test.nested", "element type"),
              kv_bytes("test.nested", ARRAY, struct.pack("<IQIQ", ARRAY, 1, 77, 1)))
    yield ins("empty-array", (), kv_bytes("test.empty", ARRAY, struct.pack("<IQ", STRING, 0)))
    yield ins("bool-array-2", ("test.flags", "bool"),
              kv_bytes("test.flags", ARRAY, struct.pack("<IQ3B", BOOL, 3, 1, 0, 2)))
    yield ins("bool-array-ok", (), kv_bytes("test.flags", ARRAY, struct.pack("<IQ3B", BOOL, 3,
                                                                            1, 0, 1)))
    yield ins("all-scalar-types", (), kv_bytes("test.i64", 11, struct.pack("<q", -(2**62))))
    yield ins("u64-above-i64", (), kv_bytes("test.u64", U64, struct.pack("<Q", 2**64 - 1)))
    yield ins("dup-general.name", ("duplicate key", "general.name"),
              kv_bytes("general.name", STRING, gguf_string("again")))
    yield ins("dup-block-count", ("duplicate key", f"{ARCH}.block_count"),
              kv_bytes(f"{ARCH}.block_count", U32, struct.pack("<I", 2)))
    yield ins("key-too-long", ("exceeds",), kv_bytes("k" * 70000, U32, struct.pack("<I", 1)))
    yield ins("key-with-nul", (), kv_bytes("test.a\0b", U32, struct.pack("<I", 1)))
    yield ins("alignment-32", (), kv_bytes("general.alignment", U32, struct.pack("<I", 32)))
    for a in (0, 3, 48, 0xFFFFFFFF):
        yield ins(f"alignment-{a}", ("general.alignment", "power of two"),
                  kv_bytes("general.alignment", U32, struct.pack("<I", a)))
    yield ins("alignment-u64", ("general.alignment", "expected u32"),
              kv_bytes("general.alignment", U64, struct.pack("<Q", 32)))
    yield ins("alignment-string", ("general.alignment", "expected u32"),
              kv_bytes("general.alignment", STRING, gguf_string("32")))
    # Offsets that are multiples of 32 but not of 64 (the data start is padded to 64).
    yield ins("alignment-64", ("alignment",),
              kv_bytes("general.alignment", U32, struct.pack("<I", 64)), align=64)
    yield ins("alignment-2**31", ("data section", "truncated"),
              kv_bytes("general.alignment", U32, struct.pack("<I", 2**31)))


def misaligned_f32_case(h: Header) -> Case:
    """general.alignment 2 and an F32 tensor moved to an address = 2 (mod 4)."""
    t = next(t for t in h.tensors if t.name == "blk.0.attn_norm.weight")
    kv = kv_bytes("general.alignment", U32, struct.pack("<I", 2))

    def f(data: bytes) -> bytes:
        out = insert_kv(h, kv)(data)   # padded to 32: the old data section follows intact
        h2 = walk_header(out)
        new_start = h2.end + h2.end % 2
        old_start = h2.data_start
        new_off = old_start - new_start + t.offset + 2
        t2 = next(x for x in h2.tensors if x.name == t.name)
        assert new_off % 2 == 0 and (new_start + new_off) % 4 == 2
        return put("<Q", t2.offset_off, new_off)(out)
    return Case("f32-misaligned-in-memory", ("blk.0.attn_norm.weight", "aligned"), f)


def tensor_cases(h: Header) -> Iterator[Case]:
    data_size = h.size - h.data_start
    for i, t in enumerate(h.tensors):
        nm = t.name
        yield Case(f"t{i}-name-len-0", (f"tensor #{i}", "empty tensor name"),
                   put("<Q", t.name_len_off, 0))
        yield Case(f"t{i}-name-len-65", (f"tensor #{i}", "exceeds"),
                   put("<Q", t.name_len_off, 65))
        for v in (2**63, 2**64 - 1):
            yield Case(f"t{i}-name-len-{v:#x}", (f"tensor #{i}", "truncated"),
                       put("<Q", t.name_len_off, v))
        yield Case(f"t{i}-renamed", ("missing tensor", nm),
                   put_bytes(t.name_len_off + 8 + len(nm) - 1, b"#"))
        for v in (0, 5, 0xFFFFFFFF):
            yield Case(f"t{i}-n-dims-{v:#x}", (f"tensor '{nm}'", "n_dims"),
                       put("<I", t.n_dims_off, v))
        for d, off in enumerate(t.ne_offs):
            yield Case(f"t{i}-ne{d}-zero", (f"tensor '{nm}'", "zero"), put("<Q", off, 0))
        yield Case(f"t{i}-ne0-2**63", (f"tensor '{nm}'", "overflow"),
                   put("<Q", t.ne_offs[0], 2**63))
        yield Case(f"t{i}-ne-last-2**40", (f"tensor '{nm}'", "outside"),
                   put("<Q", t.ne_offs[-1], 2**40))
        if len(t.ne) == 2:
            yield Case(f"t{i}-ne-both-2**31", (f"tensor '{nm}'", "overflow"),
                       chain(put("<Q", t.ne_offs[0], 2**31 * 128), put("<Q", t.ne_offs[1],
                                                                      2**31)))
        if t.ggml_type == 36:
            yield Case(f"t{i}-i2s-ne0-100", (f"tensor '{nm}'", "multiple of 128"),
                       put("<Q", t.ne_offs[0], 100))
        if nm != "token_embd.weight":   # its ne[1] is n_vocab: checked against vocab_size
            d = len(t.ne) - 1
            if t.ggml_type != 36 or d == 1:
                yield Case(f"t{i}-shape-smaller", (f"tensor '{nm}'", "shape"),
                           put("<Q", t.ne_offs[d], t.ne[d] // 2))
        else:
            yield Case(f"t{i}-vocab-smaller", ("vocab_size",), put("<Q", t.ne_offs[1], 256))
            yield Case(f"t{i}-embd-smaller", (f"tensor '{nm}'", "shape"),
                       put("<Q", t.ne_offs[0], 64))
        for v, name in ((2, "Q4_0"), (8, "Q8_0"), (30, "BF16"), (37, "unsupported tensor type"),
                        (0xFFFFFFFF, "unsupported tensor type")):
            # token_embd may be Q8_0 (model-format §10.1.6): its F16 bytes read as Q8_0 blocks
            # fit, so that file loads (and runs, in the sanitizer corpus)
            words = () if (v, nm) == (8, "token_embd.weight") else (f"tensor '{nm}'", name)
            yield Case(f"t{i}-type-{v:#x}", words, put("<I", t.type_off, v))
        other = {0: 1, 1: 0, 36: 1}[t.ggml_type]
        yield Case(f"t{i}-type-swapped", (nm,), put("<I", t.type_off, other))
        for v in (t.offset + 1, t.offset + 16, t.offset + 31):
            yield Case(f"t{i}-offset-unaligned-{v - t.offset}", (f"tensor '{nm}'", "alignment"),
                       put("<Q", t.offset_off, v))
        for v in sorted({2**63, 2**64 - 32, -(-data_size // 32) * 32,
                         data_size - data_size % 32}):
            yield Case(f"t{i}-offset-{v:#x}", (f"tensor '{nm}'", "outside"),
                       put("<Q", t.offset_off, v))
    # Duplicate tensor names: rename to an earlier name of the same length.
    by_len: dict[int, TensorInfo] = {}
    for t in h.tensors:
        first = by_len.setdefault(len(t.name), t)
        if first is not t:
            yield Case(f"dup-tensor-{t.name}", ("duplicate tensor name", first.name),
                       put_bytes(t.name_len_off + 8, first.name.encode()))


def truncation_cases(h: Header) -> Iterator[Case]:
    """Truncation at the start and middle of every header field, and in the data."""
    points: set[int] = {0, 1, 4, 6, 8, 12, 16, 20, 23, 24}
    for kv in h.kvs:
        points |= {kv.key_len_off, kv.key_len_off + 4, kv.key_len_off + 9, kv.type_off,
                   kv.type_off + 2, kv.value_off, kv.value_off + 1}
        if kv.vtype == ARRAY:
            points |= {kv.count_off, kv.count_off + 4, kv.count_off + 8, kv.count_off + 9}
            for off in kv.elem_offs[:2] + kv.elem_offs[-2:]:
                points |= {off, off + 3, off + 9}
    for t in h.tensors:
        points |= {t.name_len_off, t.name_len_off + 5, t.name_len_off + 10, t.n_dims_off,
                   t.n_dims_off + 3, t.type_off, t.type_off + 1, t.offset_off,
                   t.offset_off + 7}
        points |= {o for o in t.ne_offs} | {o + 4 for o in t.ne_offs}
    points |= {h.end, h.data_start, h.data_start + 1}
    for t in h.tensors:
        start = h.data_start + t.offset
        points |= {start + 1, start + 100}
    points |= {h.size - 1, h.size - 28, h.size - 33, h.size // 2}
    for p in sorted(x for x in points if x < h.size):
        yield Case(f"truncate-{p}", ("truncated",), truncate(p))


def writer_cases() -> Iterator[Case]:
    """Files the writer expresses directly: missing keys and tensors, wrong values, shapes."""
    T = gw.GGML_TYPE_I2_S

    def w(case_id: str, words: tuple[str, ...], shape: gw.ModelShape = MINI,
          **kwargs: object) -> Case:
        def write(path: Path) -> object:
            return gw.write_model(path, shape, seed=3, **kwargs)  # type: ignore[arg-type]
        return Case("w-" + case_id, words, write=write)

    from gguf import GGUFValueType as V

    a = ARCH
    yield w("valid", ())
    yield w("valid-untied", (), tie_head=False)
    yield w("valid-bitnet-25", (), dataclasses.replace(MINI, architecture="bitnet-25"))
    yield w("arch-bitnet", ("architecture 'bitnet'", "older"),
            dataclasses.replace(MINI, architecture="bitnet"))
    yield w("arch-qwen2", ("unsupported architecture", "qwen2", "llama", "qwen3"),
            dataclasses.replace(MINI, architecture="qwen2"))
    yield w("arch-u32", ("general.architecture", "type u32"),
            extra_metadata={"general.architecture": (7, V.UINT32)})
    yield w("arch-empty", ("unsupported architecture",), extra_metadata={
        "general.architecture": ""})
    required = ["context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.dimension_count"]
    for s in required:
        yield w(f"drop-{s}", ("missing key", f"{a}.{s}"), drop_keys=[f"{a}.{s}"])
    yield w("drop-architecture", ("missing key", "general.architecture"),
            drop_keys=["general.architecture"])
    yield w("drop-vocab-size", (), drop_keys=[f"{a}.vocab_size"])
    yield w("drop-tokens", (), drop_keys=["tokenizer.ggml.tokens"])
    yield w("drop-defaults", (), drop_keys=[f"{a}.rope.freq_base",
                                            f"{a}.attention.layer_norm_rms_epsilon"])
    for key, value, words in [
        ("attention.head_count", 3, ("head_count",)),
        ("attention.head_count_kv", 3, ("head_count_kv",)),
        ("attention.head_count", 128, ("odd",)),
        ("attention.head_count", 4, ("rope.dimension_count",)),
        ("rope.dimension_count", 32, ("rope.dimension_count",)),
        ("block_count", 3, ("block_count",)),
        ("block_count", 1000000, ("block_count",)),
        ("feed_forward_length", 256, ("blk.0.ffn_gate.weight", "shape")),
        ("vocab_size", 511, ("vocab_size",)),
        ("context_length", 0, ("context_length", "range")),
        ("context_length", (-1, V.INT32), ("context_length", "range")),
        ("context_length", (2**40, V.UINT64), ("context_length", "range")),
        ("context_length", (2**64 - 1, V.UINT64), ("context_length", "range")),
        ("block_count", (2.0, V.FLOAT32), ("block_count", "type")),
        ("block_count", ("2", V.STRING), ("block_count", "type")),
        ("block_count", (2, V.INT64), ("block_count", "type")),
        ("block_count", (2, V.UINT16), ("block_count", "type")),
        ("attention.layer_norm_rms_epsilon", (1, V.UINT32), ("layer_norm_rms_epsilon", "type")),
        ("attention.layer_norm_rms_epsilon", -1e-5, ("layer_norm_rms_epsilon", "range")),
        ("rope.freq_base", (1e300, V.FLOAT64), ("freq_base", "range")),
        ("rope.freq_base", (math.nan, V.FLOAT64), ("freq_base", "range")),
    ]:
        shown = f"{value[0]}-{value[1].name.lower()}" if isinstance(value, tuple) else value
        yield w(f"{key}={shown}", words, extra_metadata={f"{a}.{key}": value})
    yield w("embedding-length-256", ("token_embd.weight", "shape"), extra_metadata={
        f"{a}.embedding_length": 256, f"{a}.rope.dimension_count": 128})
    yield w("block-count-1", (), extra_metadata={f"{a}.block_count": 1})
    yield w("block-count-u64", (), extra_metadata={f"{a}.block_count": (2, V.UINT64)})
    yield w("eps-f64", (), extra_metadata={f"{a}.attention.layer_norm_rms_epsilon":
                                           (1e-6, V.FLOAT64)})
    yield w("tokens-short", ("tokenizer.ggml.tokens",),
            extra_metadata={"tokenizer.ggml.tokens": ["a"] * 511})
    yield w("tokens-ints", ("tokenizer.ggml.tokens",),
            extra_metadata={"tokenizer.ggml.tokens": [1] * 512})
    for name in ("token_embd.weight", "blk.1.ffn_down.weight", "output_norm.weight",
                 "blk.0.attn_sub_norm.weight"):
        yield w(f"drop-{name}", ("missing tensor", name), drop_tensors=[name])
    e, f = MINI.n_embd, MINI.n_ff
    yield w("norm-long", ("blk.1.ffn_norm.weight", "shape"),
            tensor_overrides={"blk.1.ffn_norm.weight": np.ones(e + 1, np.float32)})
    yield w("norm-2d", ("blk.0.ffn_sub_norm.weight", "shape"),
            tensor_overrides={"blk.0.ffn_sub_norm.weight": np.ones((2, f), np.float32)})
    yield w("norm-2d-unit", (), tensor_overrides={
        "blk.0.ffn_sub_norm.weight": np.ones((1, f), np.float32)})
    yield w("norm-f16", ("output_norm.weight", "type F16"),
            tensor_overrides={"output_norm.weight": np.ones(e, np.float16)})
    yield w("embd-f32", ("token_embd.weight", "type F32"),
            tensor_overrides={"token_embd.weight": np.zeros((512, e), np.float32)})
    yield w("head-wrong-shape", ("output.weight", "shape"), tie_head=False,
            tensor_overrides={"output.weight": np.zeros((512, e // 2), np.float16)})
    yield w("head-f32", ("output.weight", "type F32"), tie_head=False,
            tensor_overrides={"output.weight": np.zeros((512, e), np.float32)})
    codes = gw.pack_i2s(np.zeros((2 * e, e), np.int8), 1.0)
    yield w("i2s-shape", ("blk.0.attn_k.weight", "shape"), tensor_overrides={
        "blk.0.attn_k.weight": gw.RawTensor(codes, (2 * e, e), T)})
    yield w("i2s-transposed", ("blk.0.attn_k.weight", "multiple of 128"), tensor_overrides={
        "blk.0.attn_k.weight": gw.RawTensor(
            bytes(e * MINI.kv_dim // 4) + struct.pack("<f", 1.0) + bytes(28), (e, MINI.kv_dim),
            T)})
    yield w("i2s-nan-scale", ("blk.1.attn_q.weight", "scale"), tensor_overrides={
        "blk.1.attn_q.weight": (np.zeros((e, e), np.int8), math.nan)})
    nan_norm = np.ones(e, np.float32)
    nan_norm[5] = math.nan
    yield w("norm-nan", ("blk.1.attn_norm.weight", "non-finite"),
            tensor_overrides={"blk.1.attn_norm.weight": nan_norm})
    yield w("norm-inf", ("output_norm.weight", "non-finite"),
            tensor_overrides={"output_norm.weight": np.full(e, np.inf, np.float32)})
    # Loads; the forward pass then sees NaN everywhere (the sanitizer run goes through it).
    yield w("embd-nan", (), tensor_overrides={
        "token_embd.weight": np.full((512, e), np.nan, np.float16)})
    yield from q8_0_cases(w, MINI, "bitnet")
    yield w("extra-q4", ("extra.weight", "Q4_0"), tensor_overrides={
        "extra.weight": gw.RawTensor(bytes(18 * 4), (128,), 2)})
    yield w("extra-f32", (), tensor_overrides={"extra.weight": np.ones(3, np.float32)})
    yield from llama_cases(w)
    yield from qwen3_cases(w)
    yield from bonsai_cases(w)
    yield from rope_scaling_cases(w)


#: The Llama graph with I2_S projections (model-format §10.4) at MINI's size.
MINI_LLAMA = dataclasses.replace(MINI, architecture="llama", rope_base=1000042.0, rms_eps=1e-6)


def llama_cases(w: Callable[..., Case]) -> Iterator[Case]:
    """Files of the Llama graph (architecture 'llama'): its keys, its tensors, and the
    tensors of other graphs that must not be there (model-format §10.3, §10.4)."""
    from gguf import GGUFValueType as V

    L, a = MINI_LLAMA, "llama"
    e, f, qd = L.n_embd, L.n_ff, L.q_dim
    yield w("llama-valid", (), L)
    yield w("llama-valid-tied", (), L, tie_head=True)
    yield w("llama-valid-head-dim-128", (), dataclasses.replace(L, n_head_dim=128))
    yield w("llama-valid-key-length", (), L, extra_metadata={
        f"{a}.attention.key_length": L.head_dim, f"{a}.attention.value_length": L.head_dim})
    yield w("llama-valid-no-rope-dims", (), L, drop_keys=[f"{a}.rope.dimension_count"])
    yield w("llama-valid-rope-scaling-none", (), L, extra_metadata={
        f"{a}.rope.scaling.type": "none"})
    for key, value, words in [
        ("attention.key_length", 32, ("rope.dimension_count", "partial")),
        ("attention.value_length", 32, ("value_length",)),
        ("attention.key_length", (64.0, V.FLOAT32), ("key_length", "type")),
        ("attention.key_length", 0, ("key_length", "range")),
        ("rope.dimension_count", 3, ("rope.dimension_count", "odd")),
        ("rope.dimension_count", ("64", V.STRING), ("rope.dimension_count", "type")),
        ("rope.freq_base", (1000042, V.UINT32), ("freq_base", "type")),
        ("rope.freq_base", 0.0, ("freq_base", "range")),
        ("attention.layer_norm_rms_epsilon", ("1e-6", V.STRING), ("rms_epsilon", "type")),
        ("attention.head_count_kv", (2.0, V.FLOAT32), ("head_count_kv", "type")),
        ("attention.head_count_kv", 3, ("head_count_kv",)),
        ("attention.head_count", 3, ("head_count",)),
        ("block_count", 3, ("block_count",)),
        ("feed_forward_length", 256, ("blk.0.ffn_gate.weight", "shape")),
        ("vocab_size", 511, ("vocab_size",)),
    ]:
        shown = f"{value[0]}-{value[1].name.lower()}" if isinstance(value, tuple) else value
        yield w(f"llama-{key}={shown}", words, L, extra_metadata={f"{a}.{key}": value})
    # D = 128 from the key with 2 heads: q is 256 wide, but the file's q is E = 128 wide
    yield w("llama-head-dim-key-vs-tensors", ("blk.0.attn_q.weight", "shape"), L,
            extra_metadata={f"{a}.rope.dimension_count": 128})
    yield w("llama-head-dim-odd-width", ("multiple of 128",),
            dataclasses.replace(L, n_head=1, n_head_kv=1),
            extra_metadata={f"{a}.rope.dimension_count": 96})
    for s in ("context_length", "embedding_length", "block_count", "feed_forward_length",
              "attention.head_count", "attention.head_count_kv"):
        yield w(f"llama-drop-{s}", ("missing key", f"{a}.{s}"), L, drop_keys=[f"{a}.{s}"])
    for name in ("token_embd.weight", "blk.0.attn_norm.weight", "blk.1.attn_v.weight",
                 "blk.0.attn_output.weight", "blk.1.ffn_norm.weight", "blk.0.ffn_gate.weight",
                 "blk.1.ffn_up.weight", "blk.1.ffn_down.weight", "output_norm.weight"):
        yield w(f"llama-drop-{name}", ("missing tensor", name), L, drop_tensors=[name])
    # tensors of other graphs: a BitNet file relabelled 'llama' would run without its norms
    for name, words in [
        ("blk.0.attn_sub_norm.weight", ("not part of", "sub-norms")),
        ("blk.1.ffn_sub_norm.weight", ("not part of", "sub-norms")),
        ("blk.0.attn_q_norm.weight", ("not part of", "QK-norms")),
        ("blk.1.ffn_down_norm_in.weight", ("not part of", "input norms")),
    ]:
        n = f if "ffn_down" in name or "ffn_sub" in name else e
        yield w(f"llama-foreign-{name}", (name,) + words, L,
                tensor_overrides={name: np.ones(n, np.float32)})
    yield w("llama-bitnet-layout", ("attn_sub_norm", "not part of"),
            dataclasses.replace(MINI, architecture="bitnet-b1.58"),
            extra_metadata={"general.architecture": "llama"} | {
                f"llama.{k}": v for k, v in (
                    ("context_length", 64), ("embedding_length", e), ("block_count", 2),
                    ("feed_forward_length", f), ("attention.head_count", 2),
                    ("attention.head_count_kv", 1))})
    yield w("llama-rope-freqs", ("rope_freqs.weight", "not supported"), L,
            tensor_overrides={"rope_freqs.weight": np.ones(L.head_dim // 2, np.float32)})
    # the head: F16 or Q8_0 [E, vocab] (model-format §10.1.6), or absent (then token_embd)
    yield w("llama-valid-head-q8_0", (), L, tensor_overrides={
        "output.weight": gw.RawTensor(bytes(512 * e // 32 * 34), (512, e), 8)})
    yield w("llama-valid-head-q8_0-random", (), dataclasses.replace(L, output_type="q8_0"))
    yield from q8_0_cases(w, L, "llama")
    yield w("llama-head-f32", ("output.weight", "type F32"), L,
            tensor_overrides={"output.weight": np.zeros((512, e), np.float32)})
    yield w("llama-head-shape", ("output.weight", "shape"), L,
            tensor_overrides={"output.weight": np.zeros((256, e), np.float16)})
    T = gw.GGML_TYPE_I2_S
    yield w("llama-q-f16", ("blk.0.attn_q.weight", "type F16"), L,
            tensor_overrides={"blk.0.attn_q.weight": gw.RawTensor(
                bytes(2 * e * qd), (qd, e), gw.GGML_TYPE_F16)})
    yield w("llama-o-transposed", ("blk.1.attn_output.weight", "shape"),
            dataclasses.replace(L, n_head_dim=128), tensor_overrides={
                "blk.1.attn_output.weight": gw.RawTensor(
                    bytes(e * 2 * 128 // 4 + 32), (2 * 128, e), T)})
    yield w("llama-down-nan-scale", ("blk.1.ffn_down.weight", "scale"), L, tensor_overrides={
        "blk.1.ffn_down.weight": (np.zeros((e, f), np.int8), math.nan)})
    yield w("llama-norm-f16", ("blk.0.ffn_norm.weight", "type F16"), L,
            tensor_overrides={"blk.0.ffn_norm.weight": np.ones(e, np.float16)})


def q8_0_cases(w: Callable[..., Case], shape: gw.ModelShape, label: str) -> Iterator[Case]:
    """Q8_0 (ggml type 8, model-format §10.1.6) on a graph: a valid tied Q8_0 token_embd;
    rows that are not whole 32-weight blocks, data cut short, a wrong shape, and Q8_0 where
    the graph wants its projection format or a float norm, each refused naming the tensor."""
    e, q8 = shape.n_embd, gw.GGML_TYPE_Q8_0
    yield w(f"{label}-valid-embd-q8_0-tied", (), dataclasses.replace(
        shape, token_embd_type="q8_0"), tie_head=True)
    for name, ne0 in (("output.weight", 48), ("token_embd.weight", 100)):
        yield w(f"{label}-q8_0-{name}-ne0-{ne0}", (f"tensor '{name}'", "Q8_0", "multiple of 32"),
                shape, tie_head=False, tensor_overrides={
                    name: gw.RawTensor(bytes(512 * 64), (512, ne0), q8)})
    # output.weight is the file's last tensor: four blocks short of its 34-byte blocks
    yield w(f"{label}-q8_0-head-truncated", ("tensor 'output.weight'", "Q8_0", "outside"),
            shape, tie_head=False, tensor_overrides={
                "output.weight": gw.RawTensor(bytes(512 * e // 32 * 34 - 4 * 34), (512, e), q8)})
    yield w(f"{label}-q8_0-head-shape", ("output.weight", "shape"), shape, tie_head=False,
            tensor_overrides={"output.weight": gw.RawTensor(bytes(256 * e // 32 * 34),
                                                            (256, e), q8)})
    # (not blk.0.attn_q, whose type picks among the qwen3 descriptions: model-format §10.1.5)
    want, f = ("Q2_0" if shape.is_bonsai else "I2_S"), shape.n_ff
    yield w(f"{label}-q8_0-ffn-up", ("blk.1.ffn_up.weight", "type Q8_0", f"expected {want}"),
            shape, tensor_overrides={"blk.1.ffn_up.weight": gw.RawTensor(
                bytes(f * e // 32 * 34), (f, e), q8)})
    yield w(f"{label}-q8_0-norm", ("blk.1.ffn_norm.weight", "type Q8_0", "expected F"), shape,
            tensor_overrides={"blk.1.ffn_norm.weight": gw.RawTensor(bytes(e // 32 * 34), (e,),
                                                                    q8)})


#: The Qwen3 embedding graph (model-format §10.5) at MINI's size, head_dim 128 != E / H.
MINI_QWEN3 = dataclasses.replace(MINI, architecture="qwen3", rope_base=1e6, rms_eps=1e-6,
                                 n_head_dim=128, pooling_type=gw.POOLING_LAST)


def qwen3_cases(w: Callable[..., Case]) -> Iterator[Case]:
    """Files of the BitNet embedding graph (architecture 'qwen3' with I2_S projections): its
    keys, its F16 norms (QK-norms and the seven input norms of every layer), and the files of
    other graphs under that name (model-format §10.3, §10.5.3)."""
    Q, a = MINI_QWEN3, "qwen3"
    e, f, qd, d = Q.n_embd, Q.n_ff, Q.q_dim, Q.head_dim
    f16 = gw.GGML_TYPE_F16
    yield w("qwen3-valid", (), Q)
    yield w("qwen3-valid-untied", (), Q, tie_head=False)
    yield from q8_0_cases(w, Q, "qwen3")
    yield w("qwen3-valid-no-pooling-key", (), dataclasses.replace(Q, pooling_type=None))
    yield w("qwen3-valid-rope-dims-only", (), Q,
            drop_keys=[f"{a}.attention.key_length", f"{a}.attention.value_length"])
    # trap B.2.1: a Qwen3 I2_S file without the input norms would run, and compute another
    # model; every one of the seven is required in every layer
    for il, proj in [(0, "attn_q"), (1, "attn_k"), (0, "attn_v"), (1, "attn_output"),
                     (0, "ffn_gate"), (1, "ffn_up"), (1, "ffn_down")]:
        name = f"blk.{il}.{proj}_norm_in.weight"
        yield w(f"qwen3-drop-{name}", ("missing tensor", name), Q, drop_tensors=[name])
    no_norm_in = [f"blk.{il}.{p}_norm_in.weight" for il in range(Q.n_layer)
                  for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                            "ffn_down")]
    yield w("qwen3-no-input-norms", ("missing tensor", "blk.0.attn_q_norm_in.weight"), Q,
            drop_tensors=no_norm_in)
    for name in ("blk.0.attn_q_norm.weight", "blk.1.attn_k_norm.weight", "output_norm.weight",
                 "blk.0.attn_norm.weight", "blk.1.ffn_norm.weight"):
        yield w(f"qwen3-drop-{name}", ("missing tensor", name), Q, drop_tensors=[name])
    # trap B.2.4: the norms are F16; F32 ones are another converter's file
    for name, n in [("blk.0.attn_q_norm_in.weight", e), ("blk.1.attn_output_norm_in.weight", qd),
                    ("blk.0.attn_k_norm.weight", d), ("blk.1.attn_norm.weight", e),
                    ("output_norm.weight", e)]:
        yield w(f"qwen3-f32-{name}", (name, "type F32", "expected F16"), Q,
                tensor_overrides={name: np.ones(n, np.float32)})
    # shapes: q/k-norm over D, attn_output's input norm over H*D, ffn_down's over F
    for name, n, words in [("blk.0.attn_q_norm.weight", 2 * d, ()),
                           ("blk.1.attn_output_norm_in.weight", e, ()),
                           ("blk.0.ffn_down_norm_in.weight", e + 128, ()),
                           ("blk.1.ffn_gate_norm_in.weight", f + 128, ())]:
        yield w(f"qwen3-shape-{name}", (name, "shape") + words, Q,
                tensor_overrides={name: np.ones(n, np.float16)})
    for name, n in [("blk.1.attn_v_norm_in.weight", e), ("blk.0.attn_k_norm.weight", d)]:
        bad = np.ones(n, np.float16)
        bad[n - 1] = np.inf
        yield w(f"qwen3-inf-{name}", (name, "non-finite"), Q, tensor_overrides={name: bad})
    yield w("qwen3-nan-output-norm", ("output_norm.weight", "non-finite"), Q,
            tensor_overrides={"output_norm.weight": np.full(e, np.nan, np.float16)})
    # head dimension: value_length must agree; E / H = 64 does not fit the tensors
    yield w("qwen3-value-length", ("value_length",), Q,
            extra_metadata={f"{a}.attention.value_length": 64})
    yield w("qwen3-head-dim-from-e-over-h", ("blk.0.attn_q.weight", "shape"), Q,
            drop_keys=[f"{a}.attention.key_length", f"{a}.attention.value_length",
                       f"{a}.rope.dimension_count"])
    yield w("qwen3-key-length-type", ("key_length", "type"), Q,
            extra_metadata={f"{a}.attention.key_length": ("128", gw_value_string())})
    for s in ("embedding_length", "block_count", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "context_length"):
        yield w(f"qwen3-drop-{s}", ("missing key", f"{a}.{s}"), Q, drop_keys=[f"{a}.{s}"])
    # other graphs under the name: sub-norms; F16 projections (a plain Qwen3 file); Q2_0
    # projections (Ternary Bonsai, model-format §10.6: not implemented)
    yield w("qwen3-foreign-sub-norm", ("blk.0.attn_sub_norm.weight", "not part of", "sub-norms"),
            Q, tensor_overrides={"blk.0.attn_sub_norm.weight": np.ones(qd, np.float32)})
    yield w("qwen3-q-f16", ("blk.0.attn_q.weight", "type F16", "expected I2_S"), Q,
            tensor_overrides={"blk.0.attn_q.weight": gw.RawTensor(bytes(2 * e * qd), (qd, e),
                                                                  f16)})
    # a Q2_0 attn_q picks the Bonsai description, which has no input norms
    yield w("qwen3-q2_0-among-i2_s", ("attn_q_norm_in", "not part of", "Ternary Bonsai"), Q,
            tensor_overrides={"blk.0.attn_q.weight": gw.RawTensor(
                bytes(qd * e // 64 * 18), (qd, e), 42)})
    yield w("qwen3-head-f32", ("output.weight", "type F32"), Q,
            tensor_overrides={"output.weight": np.zeros((512, e), np.float32)})


#: Ternary Bonsai (Qwen3 with Q2_0 weights, model-format §10.6) at MINI's size.
MINI_BONSAI = dataclasses.replace(MINI_QWEN3, pooling_type=None, weight_format="q2_0")


def bonsai_cases(w: Callable[..., Case]) -> Iterator[Case]:
    """Files of the Q2_0 graph: its Q2_0 tensors, F16 or Q2_0 embedding and head, F32 norms,
    no input norms, and the older g128 layout of type 42 (model-format §10.6.1)."""
    B, e, qd = MINI_BONSAI, MINI_BONSAI.n_embd, MINI_BONSAI.q_dim
    q2 = gw.GGML_TYPE_Q2_0
    yield w("bonsai-valid", (), B)
    yield w("bonsai-valid-untied", (), B, tie_head=False)
    yield w("bonsai-valid-f16-embd", (), B, tensor_overrides={
        "token_embd.weight": np.full((512, e), 0.01, np.float16)})
    yield w("bonsai-valid-f16-head", (), B, tie_head=False, tensor_overrides={
        "output.weight": np.full((512, e), 0.01, np.float16)})
    # PrismML's layout of type 42 (34 bytes per 128 weights), whole files of it load; one
    # tensor of it among mainline ones makes a file that mixes both, refused
    G = dataclasses.replace(B, q2_0_block=128)
    yield w("bonsai-valid-g128", (), G)
    yield w("bonsai-valid-g128-untied", (), G, tie_head=False)
    yield w("bonsai-g128-mixed", ("token_embd.weight", "not in PrismML's layout",
                                  "blk.0.attn_q.weight", "one layout of type 42"), B,
            tensor_overrides={"blk.0.attn_q.weight": gw.RawTensor(
                bytes(qd * e // 128 * 34), (qd, e), q2)})
    yield w("bonsai-g128-width-192", ("extra.weight", "not in PrismML's layout"), G,
            tensor_overrides={"extra.weight": gw.RawTensor(bytes(18 * 3), (1, 192), q2)})
    yield w("bonsai-g128-short", ("blk.1.ffn_down.weight", "not in PrismML's layout"), G,
            tensor_overrides={"blk.1.ffn_down.weight": gw.RawTensor(
                bytes(e * MINI.n_ff // 128 * 34 - 64), (e, MINI.n_ff), q2)})
    yield w("bonsai-q2_0-short", ("blk.1.ffn_down.weight", "overlaps"), B,
            tensor_overrides={"blk.1.ffn_down.weight": gw.RawTensor(
                bytes(e * MINI.n_ff // 64 * 18 - 64), (e, MINI.n_ff), q2)})
    yield w("bonsai-q2_0-width-96", ("Q2_0", "multiple of 64"), B,
            tensor_overrides={"extra.weight": gw.RawTensor(bytes(18 * 2), (1, 96), q2)})
    yield w("bonsai-i2_s-among-q2_0", ("blk.1.attn_v.weight", "type I2_S", "expected Q2_0"), B,
            tensor_overrides={"blk.1.attn_v.weight": gw.RawTensor(
                bytes(B.kv_dim * e // 4 + 32), (B.kv_dim, e), gw.GGML_TYPE_I2_S)})
    yield w("bonsai-norm-f16", ("blk.0.attn_q_norm.weight", "type F16", "expected F32"), B,
            tensor_overrides={"blk.0.attn_q_norm.weight": np.ones(B.head_dim, np.float16)})
    yield w("bonsai-input-norms", ("blk.0.attn_q_norm_in.weight", "not part of", "input norms"),
            B, tensor_overrides={"blk.0.attn_q_norm_in.weight": np.ones(e, np.float32)})
    yield w("bonsai-embd-f32", ("token_embd.weight", "type F32"), B, tensor_overrides={
        "token_embd.weight": np.zeros((512, e), np.float32)})
    yield w("bonsai-drop-k-norm", ("missing tensor", "blk.1.attn_k_norm.weight"), B,
            drop_tensors=["blk.1.attn_k_norm.weight"])
    yield w("bonsai-valid-q8_0-embd-and-head", (), dataclasses.replace(
        B, token_embd_type="q8_0", output_type="q8_0"), tie_head=False)
    yield from q8_0_cases(w, B, "bonsai")


def rope_scaling_cases(w: Callable[..., Case]) -> Iterator[Case]:
    """ARCH.rope.scaling.* (model-format §5.2.3.1): valid linear and YaRN files of every graph
    load (and run, in the sanitizer corpus); a type the engine does not compute, a missing or
    out-of-range factor, a YaRN file without its original context, and keys of a wrong type
    are refused naming the key."""
    from gguf import GGUFValueType as V

    yarn = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
            "rope.scaling.original_context_length": 32}
    linear = {"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}

    def keys(arch: str, base: dict[str, object], **changes: object) -> dict[str, object]:
        merged = {**base, **{k.replace("__", "."): v for k, v in changes.items()}}
        return {f"{arch}.{k}": v for k, v in merged.items() if v is not None}

    for label, shape in (("bitnet", MINI), ("llama", MINI_LLAMA), ("qwen3", MINI_QWEN3),
                         ("bonsai", MINI_BONSAI)):
        arch = shape.architecture
        yield w(f"{label}-valid-yarn", (), shape, extra_metadata=keys(arch, yarn))
        yield w(f"{label}-valid-linear", (), shape, extra_metadata=keys(arch, linear))
    # the writer's own keys: Bonsai-8B's values on the tiny Bonsai graph
    yield w("bonsai-valid-yarn-shape", (), dataclasses.replace(
        MINI_BONSAI, rope_scaling="yarn", rope_scaling_factor=4.0,
        rope_scaling_orig_ctx=16384))
    L, a = MINI_LLAMA, "llama"
    for case_id, extra in [
        ("yarn-all-keys", keys(a, yarn, **{"rope__scaling__yarn_beta_fast": 16.0,
                                           "rope__scaling__yarn_beta_slow": 2.0,
                                           "rope__scaling__attn_factor": 1.25})),
        ("yarn-f64-factor", keys(a, yarn, **{"rope__scaling__factor": (4.0, V.FLOAT64)})),
        ("yarn-u64-orig", keys(a, yarn, **{
            "rope__scaling__original_context_length": (32, V.UINT64)})),
        ("yarn-factor-1", keys(a, yarn, **{"rope__scaling__factor": 1.0})),
        ("none-with-factor", keys(a, linear, **{"rope__scaling__type": "none"})),
        ("factor-without-type", keys(a, linear, **{"rope__scaling__type": None})),
        ("scale-linear-old-key", {f"{a}.rope.scale_linear": 2.0}),
        ("attn-factor-only", {f"{a}.rope.scaling.attn_factor": 0.5}),
    ]:
        yield w(f"llama-valid-rope-{case_id}", (), L, extra_metadata=extra)
    t = f"{a}.rope.scaling.type"
    for case_id, extra, words in [
        ("type-dynamic", keys(a, yarn, **{"rope__scaling__type": "dynamic"}),
         (t, "'dynamic'", "not supported")),
        ("type-longrope", keys(a, yarn, **{"rope__scaling__type": "longrope"}),
         (t, "'longrope'", "not supported")),
        ("type-YARN", keys(a, yarn, **{"rope__scaling__type": "YARN"}), (t, "'YARN'")),
        ("type-empty", keys(a, yarn, **{"rope__scaling__type": ""}), (t, "''")),
        ("type-yarn-nul", keys(a, yarn, **{"rope__scaling__type": "yarn\0"}), (t, "'yarn?'")),
        ("type-long", keys(a, yarn, **{"rope__scaling__type": "x" * 300}), (t, "...")),
        ("type-u32", keys(a, yarn, **{"rope__scaling__type": (1, V.UINT32)}), (t, "type u32")),
        ("type-array", keys(a, yarn, **{"rope__scaling__type": ["yarn"]}), (t, "type array")),
        ("factor-nan", keys(a, yarn, **{"rope__scaling__factor": math.nan}),
         (f"{a}.rope.scaling.factor", "range")),
        ("factor-inf", keys(a, linear, **{"rope__scaling__factor": math.inf}),
         (f"{a}.rope.scaling.factor", "range")),
        ("factor-0.5", keys(a, yarn, **{"rope__scaling__factor": 0.5}),
         (f"{a}.rope.scaling.factor", "range")),
        ("factor-0", keys(a, linear, **{"rope__scaling__factor": 0.0}),
         (f"{a}.rope.scaling.factor", "range")),
        ("factor-negative", keys(a, yarn, **{"rope__scaling__factor": -4.0}),
         (f"{a}.rope.scaling.factor", "range")),
        ("factor-huge", keys(a, yarn, **{"rope__scaling__factor": 1e9}),
         (f"{a}.rope.scaling.factor", "range")),
        ("factor-f64-huge", keys(a, linear, **{"rope__scaling__factor": (1e300, V.FLOAT64)}),
         (f"{a}.rope.scaling.factor", "range")),
        ("factor-u32", keys(a, yarn, **{"rope__scaling__factor": (4, V.UINT32)}),
         (f"{a}.rope.scaling.factor", "type u32")),
        ("factor-string", keys(a, linear, **{"rope__scaling__factor": "4"}),
         (f"{a}.rope.scaling.factor", "type string")),
        ("factor-missing-yarn", keys(a, yarn, **{"rope__scaling__factor": None}),
         (f"{a}.rope.scaling.factor", "missing", "yarn")),
        ("factor-missing-linear", keys(a, linear, **{"rope__scaling__factor": None}),
         (f"{a}.rope.scaling.factor", "missing", "linear")),
        ("scale-linear-nan", {f"{a}.rope.scale_linear": math.nan},
         (f"{a}.rope.scale_linear", "range")),
        ("orig-missing", keys(a, yarn, **{"rope__scaling__original_context_length": None}),
         (f"{a}.rope.scaling.original_context_length", "missing", "yarn")),
        ("orig-0", keys(a, yarn, **{"rope__scaling__original_context_length": 0}),
         (f"{a}.rope.scaling.original_context_length", "range")),
        ("orig-negative", keys(a, yarn, **{
            "rope__scaling__original_context_length": (-32, V.INT32)}),
         (f"{a}.rope.scaling.original_context_length", "range")),
        ("orig-u64-huge", keys(a, yarn, **{
            "rope__scaling__original_context_length": (2**40, V.UINT64)}),
         (f"{a}.rope.scaling.original_context_length", "range")),
        ("orig-f32", keys(a, yarn, **{"rope__scaling__original_context_length": 32.0}),
         (f"{a}.rope.scaling.original_context_length", "type f32")),
        ("orig-string", keys(a, yarn, **{"rope__scaling__original_context_length": "32"}),
         (f"{a}.rope.scaling.original_context_length", "type string")),
        ("beta-fast-nan", keys(a, yarn, **{"rope__scaling__yarn_beta_fast": math.nan}),
         (f"{a}.rope.scaling.yarn_beta_fast", "range")),
        ("beta-fast-0", keys(a, yarn, **{"rope__scaling__yarn_beta_fast": 0.0}),
         (f"{a}.rope.scaling.yarn_beta_fast", "range")),
        ("beta-slow-negative", keys(a, yarn, **{"rope__scaling__yarn_beta_slow": -1.0}),
         (f"{a}.rope.scaling.yarn_beta_slow", "range")),
        ("beta-slow-u32", keys(a, yarn, **{"rope__scaling__yarn_beta_slow": (1, V.UINT32)}),
         (f"{a}.rope.scaling.yarn_beta_slow", "type u32")),
        ("attn-factor-nan", keys(a, yarn, **{"rope__scaling__attn_factor": math.nan}),
         (f"{a}.rope.scaling.attn_factor", "range")),
        ("attn-factor-0", keys(a, linear, **{"rope__scaling__attn_factor": 0.0}),
         (f"{a}.rope.scaling.attn_factor", "range")),
        ("attn-factor-huge", keys(a, yarn, **{"rope__scaling__attn_factor": 1e6}),
         (f"{a}.rope.scaling.attn_factor", "range")),
        ("attn-factor-string", {f"{a}.rope.scaling.attn_factor": "1"},
         (f"{a}.rope.scaling.attn_factor", "type string")),
        # the YaRN bounds divide by ln(base)
        ("yarn-base-1", keys(a, yarn, **{"rope__freq_base": 1.0}),
         (f"{a}.rope.freq_base", "yarn", "above 1")),
        ("yarn-base-0.5", keys(a, yarn, **{"rope__freq_base": 0.5}),
         (f"{a}.rope.freq_base", "yarn", "above 1")),
    ]:
        yield w(f"llama-rope-{case_id}", words, L, extra_metadata=extra)


def gw_value_string():  # type: ignore[no-untyped-def]
    from gguf import GGUFValueType as V

    return V.STRING


@lru_cache(maxsize=1)
def corpus() -> tuple[Case, ...]:
    h = walk_header(base_bytes())
    cases = [Case("base", (), lambda d: d)]
    for gen in (header_cases, kv_cases, inserted_kv_cases, tensor_cases, truncation_cases):
        cases += gen(h)
    cases.append(misaligned_f32_case(h))
    cases += writer_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    return tuple(cases)


def materialize(case: Case, path: Path) -> Path:
    if case.write is not None:
        case.write(path)
    else:
        assert case.mutate is not None
        path.write_bytes(case.mutate(base_bytes()))
    return path


def check_message(case: Case, message: str | None) -> None:
    """Assert the outcome a case expects (message None = the file loaded)."""
    if case.valid:
        assert message is None, f"{case.id}: valid file refused: {message}"
        return
    assert message is not None, f"{case.id}: malformed file was accepted"
    for word in case.words:
        assert word in message, f"{case.id}: {word!r} not in error {message!r}"


# ---- loading through the Python engine --------------------------------------------------


def _loader() -> Callable[[Path], str | None] | None:
    """The engine's loader as `path -> error message or None`; None when not built."""
    try:
        from bitnetd_trio.engine.native import Model, ModelLoadError
    except ImportError:
        pass
    else:
        def load_engine(path: Path) -> str | None:
            try:
                model = Model.load(path)
            except ModelLoadError as exc:
                assert str(exc), "ModelLoadError without a message"
                return str(exc)
            model.close()
            return None
        return load_engine
    try:
        from bitnetd_trio._native import ffi, lib  # type: ignore[import-not-found]
    except ImportError:
        return None

    def load_native(path: Path) -> str | None:
        err = ffi.new("char[1024]")
        m = lib.bn_model_load(str(path).encode(), err, 1024)
        if m == ffi.NULL:
            return ffi.string(err).decode("utf-8", "replace")
        lib.bn_model_free(m)
        return None
    return load_native


@pytest.fixture(scope="module")
def load() -> Callable[[Path], str | None]:
    loader = _loader()
    if loader is None:
        pytest.skip("engine not built (python build_native.py)")
    return loader


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.id)
def test_malformed_file_is_refused(case: Case, load: Callable[[Path], str | None],
                                   tmp_path: Path) -> None:
    check_message(case, load(materialize(case, tmp_path / "m.gguf")))


def test_corpus_is_large_and_mostly_malformed() -> None:
    cases = corpus()
    assert len(cases) >= 500
    # BitNet, Llama and Qwen3-graph valid variants, and RoPE scalings on each graph
    assert sum(c.valid for c in cases) < 80


def test_walk_finds_every_official_key_and_tensor() -> None:
    h = walk_header(base_bytes())
    assert len(h.kvs) == 24 and h.kvs[0].key == "general.architecture"
    assert len(h.tensors) == 1 + 11 * MINI.n_layer + 1
    assert h.data_start + max(t.offset for t in h.tensors) < h.size


def test_valid_model_metadata_and_hparams(tmp_path: Path) -> None:
    """Everything the loader reads back from a valid file matches what was written."""
    try:
        from bitnetd_trio.engine.native import Model
    except ImportError:
        pytest.skip("bitnetd_trio.engine.native not available yet")
    path = gw.write_model(tmp_path / "m.gguf", MINI, seed=3, tie_head=False,
                          extra_metadata={f"{ARCH}.attention.layer_norm_rms_epsilon": 2e-6})
    model = Model.load(path)
    try:
        hp = model.hparams
        assert (hp.architecture, hp.n_vocab, hp.n_embd, hp.n_layer, hp.n_ff) == (
            ARCH, 512, 128, 2, 128)
        assert (hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_ctx_train) == (2, 1, 64, 64)
        assert hp.rms_eps == pytest.approx(2e-6) and hp.rope_base == 500000.0
        assert hp.tied_head in (False, 0) and hp.file_size == path.stat().st_size
        tokens = model.metadata("tokenizer.ggml.tokens")
        assert len(tokens) == 512 and all(isinstance(t, str) for t in tokens)
        assert model.metadata("tokenizer.ggml.add_bos_token") is True
        assert model.metadata("no.such.key", 17) == 17
    finally:
        model.close()


# ---- sanitizer run ----------------------------------------------------------------------

SAN_FLAGS = ["-std=c11", "-g", "-O1", "-fsanitize=address,undefined",
             "-fno-sanitize-recover=all", "-Wall", "-Wextra", "-Werror", "-pthread"]
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:halt_on_error=1",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
FORWARD_SYMBOLS = ("bn_context_new", "bn_context_free", "bn_forward", "bn_logits")
SAMPLER_SYMBOLS = ("bn_sampler_new", "bn_sampler_free", "bn_sampler_accept",
                   "bn_sampler_sample", "bn_sampler_sample_probs")


@dataclasses.dataclass
class SanitizerBuild:
    exe: Path
    objects: list[str]          # native sources compiled in
    skipped: dict[str, str]     # native sources left out, with the compiler's complaint
    forward: bool
    sampler: bool


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)  # type: ignore[call-overload]


@pytest.fixture(scope="module")
def sanitizer_build(tmp_path_factory: pytest.TempPathFactory) -> SanitizerBuild:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc not found")
    d = tmp_path_factory.mktemp("asan")
    probe = d / "probe.c"
    probe.write_text("int main(void) { return 0; }\n")
    r = _run([gcc, *SAN_FLAGS, str(probe), "-o", str(d / "probe")])
    if r.returncode != 0 or _run([str(d / "probe")]).returncode != 0:
        pytest.skip(f"gcc lacks ASan/UBSan support: {r.stderr.strip()[:200]}")
    objects, skipped = [], {}
    for src in sorted(NATIVE.glob("*.c")) + sorted((NATIVE / "kernels").glob("*.c")):
        obj = d / (src.stem + ".o")   # stems are unique across native/ and native/kernels/
        r = _run([gcc, *SAN_FLAGS, f"-I{NATIVE}", "-c", str(src), "-o", str(obj)])
        if r.returncode == 0:
            objects.append(str(obj))
        else:
            skipped[src.name] = r.stderr.strip()[:500]
    for required in ("gguf.c", "model.c"):
        assert required not in skipped, f"{required} does not compile: {skipped[required]}"
    defined = set()
    for obj in objects:
        r = _run(["nm", "--defined-only", obj])
        defined |= {line.split()[-1] for line in r.stdout.splitlines() if " T " in line}
    forward = all(s in defined for s in FORWARD_SYMBOLS)
    sampler = all(s in defined for s in SAMPLER_SYMBOLS)
    macros = (["-DHARNESS_FORWARD"] if forward else []) + (
        ["-DHARNESS_SAMPLER"] if forward and sampler else [])
    exe = d / "load_harness"
    r = _run([gcc, *SAN_FLAGS, *macros, f"-I{NATIVE}", str(HARNESS), *objects, "-o", str(exe),
              "-lm"])
    if r.returncode != 0 and not (NATIVE / "forward.c").exists():
        # Other engine parts not written yet: the reader and loader alone.
        objects = [o for o in objects if Path(o).stem in ("gguf", "model")]
        forward = sampler = False
        r = _run([gcc, *SAN_FLAGS, f"-I{NATIVE}", str(HARNESS), *objects, "-o", str(exe),
                  "-lm"])
    assert r.returncode == 0, f"harness does not link: {r.stderr[:2000]}"
    return SanitizerBuild(exe, [Path(o).stem + ".c" for o in objects], skipped, forward,
                          sampler)


def _assert_clean(r: subprocess.CompletedProcess[str]) -> None:
    for marker in ("runtime error", "AddressSanitizer", "LeakSanitizer", "CONTRACT"):
        assert marker not in r.stderr, r.stderr[-4000:]
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-4000:]}"


def test_sanitizer_corpus(sanitizer_build: SanitizerBuild, tmp_path: Path) -> None:
    """The whole corpus (and two valid tiny models) through ASan+UBSan: no error, every
    malformed file refused with its expected words, every valid one loaded (and run)."""
    cases = list(corpus())
    valid = [Case("tiny", (), write=lambda p: gw.write_model(p, gw.TINY, seed=1)),
             Case("smallest-untied", (), write=lambda p: gw.write_model(
                 p, gw.SMALLEST, seed=2, tie_head=False))]
    cases += valid
    batch = 200   # bounds the disk space in use at once
    seen = 0
    for start in range(0, len(cases), batch):
        part = cases[start:start + batch]
        paths = [materialize(c, tmp_path / f"{start + i}.gguf") for i, c in enumerate(part)]
        r = _run([str(sanitizer_build.exe), *map(str, paths)], env={**os.environ, **SAN_ENV},
                 timeout=600)
        _assert_clean(r)
        lines = r.stdout.splitlines()
        assert len(lines) == len(part), r.stdout[-2000:]
        for case, path, line in zip(part, paths, lines):
            m = re.match(r"(OK|ERR) (.*?): (.*)$", line)
            assert m and m.group(2) == str(path), line
            check_message(case, None if m.group(1) == "OK" else m.group(3))
            seen += 1
        for p in paths:
            p.unlink()
    assert seen == len(cases)


def test_sanitizer_fuzz(sanitizer_build: SanitizerBuild, tmp_path: Path) -> None:
    """A few thousand seeded random mutations (bytes, bit flips, interesting u32/u64 values,
    chunk copies, truncation), mostly in the header, in one sanitized process."""
    base = gw.write_model(tmp_path / "base.gguf", MINI, seed=5)
    h = walk_header(base.read_bytes())
    r = _run([str(sanitizer_build.exe), "--fuzz", "20261122", "8000", "20000", str(base),
              str(tmp_path / "work.gguf"), str(h.end), str(h.tensors[0].name_len_off)],
             env={**os.environ, **SAN_ENV},
             timeout=600)
    _assert_clean(r)
    m = re.search(r"FUZZ (\d+) mutations, (\d+) loaded, (\d+) rejected", r.stdout)
    assert m, r.stdout
    done, loaded, rejected = map(int, m.groups())
    assert done >= 500 and rejected > done // 4 and loaded > 0


def test_sanitizer_run_includes_forward(sanitizer_build: SanitizerBuild) -> None:
    """Once the forward pass exists, the sanitizer run must exercise it."""
    if not (NATIVE / "forward.c").exists():
        pytest.skip("native/forward.c not written yet")
    assert not sanitizer_build.skipped, sanitizer_build.skipped
    assert sanitizer_build.forward and sanitizer_build.sampler, sanitizer_build.objects


def test_sanitizer_kernels_match_scalar(sanitizer_build: SanitizerBuild) -> None:
    """Every kernel set the CPU has, built with ASan+UBSan, computes the I2_S and Q2_0
    products of tests/c/kernel_harness.c bit for bit as the scalar set, over shapes that reach
    their decode, token-group and prefill-tile paths and their tails, at 1 to 3 threads (the
    corpus run only multiplies a few tokens at a time)."""
    d = sanitizer_build.exe.parent
    objects = [str(d / (Path(name).stem + ".o")) for name in sanitizer_build.objects]
    exe = d / "kernel_harness"
    r = _run(["gcc", *SAN_FLAGS, f"-I{NATIVE}", str(HARNESS.parent / "kernel_harness.c"),
              *objects, "-o", str(exe), "-lm"])
    assert r.returncode == 0, f"kernel harness does not link: {r.stderr[:2000]}"
    r = _run([str(exe)], env={**os.environ, **SAN_ENV}, timeout=600)
    _assert_clean(r)
    assert r.stdout.splitlines()[-1] == "0 differences", r.stdout[-2000:]
    assert r.stdout.startswith("kernel sets:"), r.stdout[:200]
