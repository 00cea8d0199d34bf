"""CORS (http-api §6.1) and TLS (http-api §6.2) over real sockets: a real hypercorn behind the
daemon's accept loop, the tiny server model, httpx and bitnetctl as clients, a self-signed CA
made in the test with trustme."""

from __future__ import annotations

import json
import logging
import ssl
from pathlib import Path

import httpx
import pytest
import trio
from conftest import running_server, server_config

from bitnetd_trio.config import ConfigError, load_config
from bitnetd_trio.daemon import lifecycle
from bitnetd_trio.tools import control

APP_ORIGIN = "http://app.example:3000"
KEY = "sk-test-cors-0123456789"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}


def preflight(path: str, origin: str = APP_ORIGIN, method: str = "POST") -> dict[str, str]:
    return {"origin": origin, "access-control-request-method": method,
            "access-control-request-headers": "authorization, content-type"}


async def test_cors_is_off_by_default(server_model_path: Path) -> None:
    async with running_server(server_config(server_model_path)) as s, \
            httpx.AsyncClient(base_url=s.url) as c:
        r = await c.options("/v1/chat/completions", headers=preflight("/v1/chat/completions"))
        assert r.status_code == 405
        r = await c.get("/v1/models", headers={"origin": APP_ORIGIN})
        assert r.status_code == 200
        assert "access-control-allow-origin" not in r.headers


async def test_cors_for_listed_origins(server_model_path: Path) -> None:
    config = server_config(server_model_path, server_cors_origins=[APP_ORIGIN],
                           server_api_keys=[KEY])
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        # a preflight is answered for every route, without the API key
        paths = [p for p in s.app.routes] + ["/v1/models/anything"]
        for path in paths:
            r = await c.options(path, headers=preflight(path))
            assert r.status_code == 204, (path, r.text)
            assert r.headers["access-control-allow-origin"] == APP_ORIGIN
            assert r.headers["vary"] == "Origin"
            assert int(r.headers["access-control-max-age"]) > 0
            assert r.headers["access-control-allow-headers"] == "authorization, content-type"
            methods = {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
            assert "OPTIONS" in methods and methods & {"GET", "POST"}
        r = await c.options("/v1/embeddings", headers=preflight("/v1/embeddings"))
        assert "POST" in r.headers["access-control-allow-methods"]
        assert (await c.options("/nope", headers=preflight("/nope"))).status_code == 404
        other = await c.options("/v1/models", headers=preflight("/v1/models",
                                                                 origin="http://evil.example"))
        assert other.status_code == 403
        assert "access-control-allow-origin" not in other.headers

        auth = {"authorization": f"Bearer {KEY}", "origin": APP_ORIGIN}
        r = await c.get("/v1/models", headers=auth)
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == APP_ORIGIN
        assert r.headers["vary"] == "Origin"
        # errors carry it too, so a page can read the 401 and ask for the key
        r = await c.get("/v1/models", headers={"origin": APP_ORIGIN})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP_ORIGIN
        r = await c.get("/v1/models", headers={**auth, "origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        r = await c.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
        assert "access-control-allow-origin" not in r.headers
        # streaming
        async with c.stream("POST", "/v1/chat/completions", headers=auth,
                            json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200
            assert r.headers["access-control-allow-origin"] == APP_ORIGIN
            text = "".join([chunk async for chunk in r.aiter_text()])
        assert text.rstrip().endswith("data: [DONE]")


async def test_cors_star_and_its_warning(server_model_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="bitnetd.app"):
        config = server_config(server_model_path, server_cors_origins=["*"])
        async with running_server(config) as s, httpx.AsyncClient(base_url=s.url) as c:
            r = await c.get("/health", headers={"origin": "http://any.example"})
            assert r.headers["access-control-allow-origin"] == "*"
            r = await c.options("/v1/completions", headers=preflight("/v1/completions",
                                                                     origin="null"))
            assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "*"
    assert any("cors_origins = *" in rec.getMessage() for rec in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="bitnetd.app"):
        config = server_config(server_model_path, server_cors_origins=["*"],
                               server_api_keys=[KEY])
        async with running_server(config):
            pass
    assert not any("cors_origins" in rec.getMessage() for rec in caplog.records)


def test_cors_config_values(tmp_path: Path) -> None:
    conf = tmp_path / "b.conf"
    conf.write_text("[server]\ncors_origins = http://a.example, https://b.example:8443\n")
    assert load_config(conf, environ={}).server.cors_origins == [
        "http://a.example", "https://b.example:8443"]
    assert load_config(environ={}).server.cors_origins == []
    for bad in ("a.example", "http://a.example/path", "ftp://a.example", "http://a.example/"):
        conf.write_text(f"[server]\ncors_origins = {bad}\n")
        with pytest.raises(ConfigError, match="cors_origins"):
            load_config(conf, environ={})


# ---- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    trustme = pytest.importorskip("trustme")
    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem",
             "other_key": d / "other.key"}
    ca.cert_pem.write_to_path(files["ca"])
    cert.private_key_pem.write_to_path(files["key"])
    with open(files["cert"], "wb") as f:
        for blob in cert.cert_chain_pems:
            f.write(blob.bytes())
    ca.issue_cert("other.example").private_key_pem.write_to_path(files["other_key"])
    return files


async def test_tls_serves_https(server_model_path: Path, tls_files: dict[str, Path]) -> None:
    config = server_config(server_model_path, server_tls_cert=str(tls_files["cert"]),
                           server_tls_key=str(tls_files["key"]))
    verify = ssl.create_default_context(cafile=str(tls_files["ca"]))
    async with running_server(config) as s:
        assert s.url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(base_url=s.url, verify=verify, timeout=60) as c:
            r = await c.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            assert r.http_version == "HTTP/1.1"
            async with c.stream("POST", "/v1/chat/completions",
                                json={**CHAT, "stream": True}) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            assert lines[-1] == "data: [DONE]"
            assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"
        # ALPN: HTTP/1.1 only, even for a client that offers h2 first
        client_ctx = ssl.create_default_context(cafile=str(tls_files["ca"]))
        client_ctx.set_alpn_protocols(["h2", "http/1.1"])
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", s.port,
                                                     ssl_context=client_ctx)
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() == "http/1.1"
        await stream.aclose()
        # a client that does not trust the CA is refused by its own check
        async with httpx.AsyncClient(base_url=s.url) as c:
            with pytest.raises(httpx.ConnectError):
                await c.get("/health")
        # plain http on the TLS port gets no HTTP answer
        async with httpx.AsyncClient(base_url=s.url.replace("https", "http"), timeout=5) as c:
            with pytest.raises(httpx.HTTPError):
                await c.get("/health")
        # bitnetctl speaks https: trusting the CA, insecure, or failing without either
        where = ["-H", "127.0.0.1", "-p", str(s.port), "-P", "/nonexistent.pid", "--json"]
        run = trio.to_thread.run_sync
        assert await run(control.main, [*where, "--cacert", str(tls_files["ca"]), "status"]) == 0
        assert await run(control.main, [*where, "--insecure", "status"]) == 0
        assert await run(control.main, [*where, "--tls", "status"]) == 1
        assert await run(control.main, [*where, "status"]) == 1  # plain http


def test_tls_config_checks(tmp_path: Path, tls_files: dict[str, Path],
                           server_model_path: Path, capsys: pytest.CaptureFixture) -> None:
    conf = tmp_path / "b.conf"

    def write(**server: str) -> Path:
        lines = [f"{k} = {v}" for k, v in server.items()]
        conf.write_text(f"[model]\npath = {server_model_path}\n[server]\n" + "\n".join(lines))
        return conf

    good = load_config(write(tls_cert=tls_files["cert"], tls_key=tls_files["key"]), environ={})
    assert good.server.tls_cert == str(tls_files["cert"])
    assert lifecycle.check(str(conf)) == 0
    cases = {
        "alone": dict(tls_cert=tls_files["cert"]),
        "key alone": dict(tls_key=tls_files["key"]),
        "mismatch": dict(tls_cert=tls_files["cert"], tls_key=tls_files["other_key"]),
        "not pem": dict(tls_cert=conf, tls_key=tls_files["key"]),
        "missing": dict(tls_cert=tmp_path / "nope.pem", tls_key=tls_files["key"]),
    }
    for name, server in cases.items():
        write(**server)
        with pytest.raises(ConfigError, match="tls_"):
            load_config(conf, environ={})
        capsys.readouterr()
        assert lifecycle.check(str(conf)) == 2, name
        assert "tls_" in capsys.readouterr().err, name
    unreadable = tmp_path / "unreadable.key"
    unreadable.write_bytes(tls_files["key"].read_bytes())
    unreadable.chmod(0)
    write(tls_cert=tls_files["cert"], tls_key=unreadable)
    import os

    if os.geteuid() != 0:  # root reads anything
        assert lifecycle.check(str(conf)) == 2
