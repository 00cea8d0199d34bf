"""The names the served model answers to: its id, the alias, the file's name and path."""

from __future__ import annotations

from pathlib import Path

from bitnetd_trio.engine.inference import InferenceThread

__all__ = ["DEMO_MODEL_ID", "accepted_model_ids", "listed_model_ids", "served_model_id"]

DEMO_MODEL_ID = "bitnet-demo"


def served_model_id(engine: InferenceThread) -> str:
    """The id responses name: the model file's name (the demo model's fixed id)."""
    if engine.settings.is_demo:
        return DEMO_MODEL_ID
    return Path(engine.settings.model_path).name


def listed_model_ids(engine: InferenceThread, alias: str | None) -> list[str]:
    """The ids /v1/models lists: the served id, then the configured alias."""
    ids = [served_model_id(engine)]
    if alias and alias not in ids:
        ids.append(alias)
    return ids


def accepted_model_ids(engine: InferenceThread, alias: str | None) -> set[str]:
    """Every `model` value a request may name: the id, the alias, the file's name/stem/path."""
    path = Path(engine.settings.model_path)
    names = {served_model_id(engine), path.name, path.stem, str(path)}
    if alias:
        names.add(alias)
    return names
