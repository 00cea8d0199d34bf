"""What a request handler may use of the application: the `ServingApp` protocol.

Handlers live in their own modules (`ops`, `embeddings`, `token_count`, `web`) and the ASGI shell
(`asgi.App`) imports them to build its route table; typing the handlers against this protocol
instead of `App` keeps the import graph free of cycles.
"""

from __future__ import annotations

from typing import Protocol

from bitnetd_trio.api.cpu_work import CpuWork
from bitnetd_trio.api.metrics import Metrics
from bitnetd_trio.api.schema import SchemaDefaults
from bitnetd_trio.config import Config
from bitnetd_trio.engine.inference import InferenceThread

__all__ = ["ServingApp"]


class ServingApp(Protocol):
    """The application as its handlers see it (implemented by `asgi.App`)."""

    config: Config
    metrics: Metrics
    engine: InferenceThread | None
    cpu: CpuWork  # worker threads for work that grows with a request

    @property
    def draining(self) -> bool:
        """A stop was announced or a drain has begun: readiness is off."""
        ...

    def require_engine(self) -> InferenceThread:
        """The engine serving new requests; ApiError 503 while none is loaded."""
        ...

    def schema_defaults(self, engine: InferenceThread) -> SchemaDefaults:
        """What request validation needs from the configuration and `engine`'s model."""
        ...
