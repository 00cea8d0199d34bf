"""Embeddings from the final hidden state: which rows an embedding job asks the engine for,
and how they become one L2-normalised vector (model-format §5.3.1).

An embedding job (`Job.embed` set to a pooling kind) is a prompt fed through the engine with
the `hidden_*` output modes instead of logits: no head, no sampling. The scheduler collects
the rows chunk by chunk and pools them once the whole prompt is in; because every row is
bit-identical however the prompt is chunked and whatever it is batched with, and the pooling
runs once over all rows in token order, the vector is too.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["POOLING_TYPES", "collect_rows", "pool", "pooling_of_model", "step_mode"]

#: llama.cpp's `ARCH.pooling_type` numbers (GGUF): 0 none, 1 mean, 2 cls, 3 last, 4 rank.
POOLING_TYPES = {1: "mean", 2: "cls", 3: "last"}


def pooling_of_model(get: Any, architecture: str, graph_pooling: int = 0) -> str:
    """The pooling of the model's embeddings (model-format §10.5.4).

    A decoder (graph_pooling 0): the GGUF's `ARCH.pooling_type`, else "mean" (a decoder has
    no pooling of its own, and the mean over its tokens is the usual choice).

    A graph defined with its own pooling (`HParams.pooling`, 3 = last token for the BitNet
    embedding graph): the key's CLS or LAST is honoured, but MEAN is not: bitnet.cpp's
    converter writes MEAN whenever the checkpoint has no pooling files, so in these files it
    cannot be told from "unknown", and mean-pooling a last-token model computes another
    vector (cosine about 0.67 on the reference). The graph's own pooling is used and a
    warning logged. `get(key)` reads a metadata value (None when absent)."""
    value = get(f"{architecture}.pooling_type")
    if isinstance(value, bool) or not isinstance(value, int):
        value = None
    own = POOLING_TYPES.get(graph_pooling)
    if own is None:
        return POOLING_TYPES.get(value, "mean") if value is not None else "mean"
    if value in (2, 3):
        return POOLING_TYPES[value]
    if value is not None:
        log.warning("%s.pooling_type is %d (%s); this graph is defined with %s pooling, which "
                    "is used instead (model-format §10.5.4)", architecture, value,
                    POOLING_TYPES.get(value, "unknown"), own)
    return own


def step_mode(pooling: str, n_fed: int, n: int, remaining: int) -> str:
    """The engine output mode for a prompt chunk of n tokens after n_fed, with `remaining`
    prompt tokens still to feed (n included)."""
    if pooling == "mean":
        return "hidden_all"
    if pooling == "cls":
        return "hidden_all" if n_fed == 0 else "none"
    return "hidden_last" if n == remaining else "none"  # "last"


def collect_rows(output: Any, entry: int, pooling: str, n_fed: int, n: int,
                 remaining: int) -> list[np.ndarray]:
    """Copies of the hidden rows the chunk's output holds for the pooling (views of engine
    memory are valid only until the next forward)."""
    if pooling == "mean":
        return [np.array(output.hidden(entry, t), dtype=np.float32) for t in range(n)]
    if pooling == "cls":
        return [np.array(output.hidden(entry, 0), dtype=np.float32)] if n_fed == 0 else []
    if n == remaining:
        return [np.array(output.hidden(entry, n - 1), dtype=np.float32)]
    return []


def pool(rows: list[np.ndarray], pooling: str) -> np.ndarray:
    """One float32 vector of the rows (all of the prompt's rows for "mean", the first for
    "cls", the last for "last"), L2-normalised; computed in float64, in a fixed order that
    depends only on the number of rows."""
    if not rows:
        raise ValueError("no hidden rows to pool")
    if pooling == "mean":
        stacked = np.stack(rows).astype(np.float64)
        vec = stacked.sum(axis=0) / len(rows)
    elif pooling == "cls":
        vec = rows[0].astype(np.float64)
    else:
        vec = rows[-1].astype(np.float64)
    norm = float(np.sqrt(np.dot(vec, vec)))
    if norm > 0.0 and np.isfinite(norm):
        vec = vec / norm
    return vec.astype(np.float32)
