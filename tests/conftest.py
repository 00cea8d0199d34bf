"""Shared, synchronous, session-scoped fixtures (async fixtures must be function-scoped
under pytest-trio, so heavy shared state lives here)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from bitnetd_trio import gguf_writer as gw

#: 4 query heads per kv head (like 2B-4T's 20/5), head_dim 32.
GQA = dataclasses.replace(gw.TINY, n_head=8, n_head_kv=2)
#: head_dim 128 as in the real model, so RoPE pairing (i, i+64) vs (2i, 2i+1) matters.
HEAD128 = dataclasses.replace(gw.TINY, n_head=2, n_head_kv=1, n_ctx=512)


def _write(factory: pytest.TempPathFactory, name: str, shape: gw.ModelShape,
           seed: int) -> Path:
    return gw.write_model(factory.mktemp("models") / f"{name}.gguf", shape, seed)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY shape (n_embd 256, 4/2 heads, n_ff 384, 2 layers), tiny vocabulary, seed 0."""
    return _write(tmp_path_factory, "tiny", gw.TINY, 0)


@pytest.fixture(scope="session")
def smallest_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SMALLEST shape (n_embd 128, 2/1 heads, n_ff 256, 2 layers), seed 1."""
    return _write(tmp_path_factory, "smallest", gw.SMALLEST, 1)


@pytest.fixture(scope="session")
def gqa_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 query heads over 2 kv heads (4 per kv head), head_dim 32, seed 2."""
    return _write(tmp_path_factory, "gqa", GQA, 2)


@pytest.fixture(scope="session")
def head128_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """head_dim 128 (2 query heads, 1 kv head), context 512, seed 3."""
    return _write(tmp_path_factory, "head128", HEAD128, 3)
