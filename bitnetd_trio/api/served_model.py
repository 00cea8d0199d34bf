"""The names the served model answers to, and how its file is shown (http-api §1.3)."""

from __future__ import annotations

from pathlib import Path

from bitnetd_trio.engine.inference import InferenceThread

__all__ = [
    "DEMO_MODEL_ID",
    "accepted_model_ids",
    "model_aliases",
    "served_model_id",
    "shown_model_path",
]

DEMO_MODEL_ID = "bitnet-demo"


def served_model_id(engine: InferenceThread) -> str:
    """The id /v1/models lists and responses name: the model file's name with its `.gguf`
    (the demo model's fixed id)."""
    if engine.settings.is_demo:
        return DEMO_MODEL_ID
    return Path(engine.settings.model_path).name


def model_aliases(engine: InferenceThread, alias: str | None) -> list[str]:
    """The other names a request may use: the configured alias, then the file's stem (its
    name without `.gguf`). Never the file's path: the directory layout of the host is not
    part of the API."""
    names: list[str] = []
    candidates = [alias] if alias else []
    if not engine.settings.is_demo:
        candidates.append(Path(engine.settings.model_path).stem)
    for name in candidates:
        if name != served_model_id(engine) and name not in names:
            names.append(name)
    return names


def accepted_model_ids(engine: InferenceThread, alias: str | None) -> set[str]:
    """Every `model` value a request may name: the served id and its aliases."""
    return {served_model_id(engine), *model_aliases(engine, alias)}


def shown_model_path(engine: InferenceThread, expose_path: bool) -> str:
    """The model file as /props, /model_info and the model card show it: its name, or its
    absolute path when the operator set `[model] expose_path`."""
    path = engine.info.path
    return path if expose_path else Path(path).name
