"""Shared, synchronous, session-scoped fixtures (async fixtures must be function-scoped
under pytest-trio, so heavy shared state lives here)."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bitnetd_trio.engine import gguf_writer as gw

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


# ---- server fixtures (owned by the server helper: app.py / inference.py tests) ----------------
# A real hypercorn on 127.0.0.1:0 inside the test's nursery (async fixtures are function-scoped
# under pytest-trio; the model file is shared per session).

#: TINY with a 16384-token context, so a generation can run long enough to be interrupted
#: (the tiny model makes ~10k tokens/s) whatever the machine's load.
SERVER_SHAPE = dataclasses.replace(gw.TINY, n_ctx=16384)


@pytest.fixture(scope="session")
def server_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model the server tests serve: TINY shape, tiny vocabulary, context 16384, seed 11."""
    return _write(tmp_path_factory, "server", SERVER_SHAPE, 11)


def server_config(model_path: Path | None, **changes: object):  # -> bitnetd_trio.config.Config
    """A Config for tests: keys given as section_key=value (e.g. model_parallel=1)."""
    from bitnetd_trio.config import Config

    config = Config()
    sections: dict[str, dict[str, object]] = {
        "model": {"path": str(model_path) if model_path else None, "threads": 2,
                  "parallel": 4, "ctx_size": 16384},
        "server": {"listen": ["127.0.0.1:0"], "max_queue": 16, "request_timeout": 60.0},
    }
    for name, value in changes.items():
        section, _, key = name.partition("_")
        sections.setdefault(section, {})[key] = value
    for section, values in sections.items():
        config = dataclasses.replace(
            config, **{section: dataclasses.replace(getattr(config, section), **values)})
    return config


@dataclasses.dataclass
class RunningServer:
    url: str  # "http://127.0.0.1:PORT"
    app: object  # bitnetd_trio.api.asgi.App

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


@contextlib.asynccontextmanager
async def running_server(config) -> AsyncIterator[RunningServer]:
    """Serve `create_app(config)` with hypercorn on 127.0.0.1:0 until the block ends."""
    import trio

    from bitnetd_trio.api.asgi import create_app
    from bitnetd_trio.daemon.http_server import hypercorn_config, serve

    app = create_app(config)
    hc = hypercorn_config(config, binds=["127.0.0.1:0"])
    hc.graceful_timeout = 1.0
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, hc, stop.wait)
        url = next(b for b in binds if b.startswith("http://"))
        try:
            yield RunningServer(url, app)
        finally:
            stop.set()


async def poll_until(check, what: str, tries: int = 1000) -> None:  # type: ignore[no-untyped-def]
    """Poll the plain function `check` (bounded: `tries` times, 10 ms apart) until it is true."""
    import trio

    for _ in range(tries):
        if check():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
async def server(server_model_path: Path) -> AsyncIterator[RunningServer]:
    """A server with 4 slots on the server model."""
    async with running_server(server_config(server_model_path)) as s:
        yield s
