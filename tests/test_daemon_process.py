"""The real bitnetd as a subprocess: systemd notifications, watchdog, signals (drain, reload with a
model swap, log reopen, status), pidfile lock, daemon mode, socket activation, privilege drop,
bitnetctl. Tiny models from the project's GGUF writer; a notify socket bound by the test."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from daemon_harness import (
    BITNETCTL,
    BITNETD,
    CHILD_ENV,
    Daemon,
    NotifySocket,
    has_ipv6,
    read_proc_ids,
    run_bitnetd,
    stream_completion,
    wait_http,
    wait_until,
    write_config,
)

from bitnetd_trio.daemon.unix import read_pidfile
from bitnetd_trio.engine import gguf_writer as gw

pytestmark = pytest.mark.skipif(
    not any(Path(__file__).resolve().parents[1].joinpath("bitnetd_trio").glob("_native*.so")),
    reason="the native engine is not built (python build_native.py)",
)

#: A model whose context leaves room for long streams (so they are still running at SIGTERM).
LONG = gw.ModelShape(
    n_vocab=gw.TINY_VOCAB_SIZE, n_embd=128, n_head=2, n_head_kv=1, n_ff=256, n_layer=2, n_ctx=4096
)


@pytest.fixture(scope="session")
def model_a(tmp_path_factory) -> Path:
    return gw.write_model(tmp_path_factory.mktemp("dmodels") / "model-a.gguf", gw.TINY, seed=11)


@pytest.fixture(scope="session")
def model_b(tmp_path_factory) -> Path:
    return gw.write_model(tmp_path_factory.mktemp("dmodels") / "model-b.gguf", gw.SMALLEST, seed=12)


@pytest.fixture(scope="session")
def model_long(tmp_path_factory) -> Path:
    return gw.write_model(tmp_path_factory.mktemp("dmodels") / "model-long.gguf", LONG, seed=13)


async def start_notified(
    tmp_path: Path,
    config: Path,
    nursery: trio.Nursery,
    *,
    abstract: bool = False,
    env: dict[str, str] | None = None,
    extra_args: list[str] | None = None,
) -> tuple[Daemon, NotifySocket, int]:
    """Start bitnetd -f with a notify socket; return once READY=1 arrived (and its index)."""
    notify = NotifySocket.bind(tmp_path, abstract)
    nursery.start_soon(notify.collect)
    d = Daemon(config, env={"NOTIFY_SOCKET": notify.address, **(env or {})}, extra_args=extra_args)
    try:
        ready = await notify.wait_for(lambda m: m.has("READY", "1"), timeout=120)
    except trio.TooSlowError:
        d.kill()
        raise AssertionError(f"no READY=1; stderr: {d.stderr}") from None
    d.set_port_from_status(notify.messages[ready].get("STATUS") or "")
    return d, notify, ready


# ---- systemd notifications -----------------------------------------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_notify_sequence_and_watchdog(tmp_path, model_a, abstract):
    conf = write_config(
        tmp_path / "b.conf",
        model=model_a,
        sections={"server": {"listen": "127.0.0.1:0, [::1]:0" if has_ipv6() else "127.0.0.1:0"}},
    )
    async with trio.open_nursery() as nursery:
        d, notify, ready = await start_notified(
            tmp_path, conf, nursery, abstract=abstract, env={"WATCHDOG_USEC": "400000"}
        )
        try:
            # READY=1 means serving: /health answers 200 right away, on every listener.
            async with httpx.AsyncClient(timeout=10) as client:
                r = await client.get(d.base_url() + "/health")
                assert r.status_code == 200 and r.json()["status"] == "ok"
                status = notify.messages[ready].get("STATUS") or ""
                if has_ipv6():
                    port6 = int(status.split("[::1]:")[1].split(",")[0].split()[0])
                    r6 = await client.get(f"http://[::1]:{port6}/health")
                    assert r6.status_code == 200
            before = notify.messages[:ready]
            assert before[0].get("STATUS", "").startswith("loading ")
            assert any(m.has("EXTEND_TIMEOUT_USEC") for m in before)
            assert not any(m.has("WATCHDOG") for m in before)
            assert "serving " in status and "model-a.gguf" in status
            # Watchdog pings: every WATCHDOG_USEC/2 = 200 ms, so never a gap of 400 ms.
            await notify.wait_for(lambda m: m.has("WATCHDOG", "1"), after=ready)
            first_ping = len(notify.messages) - 1
            with trio.fail_after(30):
                while sum(m.has("WATCHDOG") for m in notify.messages[first_ping:]) < 6:
                    await trio.sleep(0.05)
            pings = [m.at for m in notify.messages[first_ping:] if m.has("WATCHDOG")]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            gaps.sort()
            median = gaps[len(gaps) // 2]
            assert 0.1 < median < 0.4, gaps
            n_before_stop = len(notify.messages)
            d.signal(signal.SIGTERM)
            assert await d.wait() == 0, d.stderr
            stop = await notify.wait_for(lambda m: m.has("STOPPING", "1"), after=n_before_stop)
            assert "draining" in (notify.messages[stop].get("STATUS") or "")
            await trio.sleep(0.1)
            assert not any(m.has("WATCHDOG") or m.has("READY") for m in notify.messages[stop:])
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


# ---- SIGTERM drain --------------------------------------------------------------------------


async def test_sigterm_ends_every_stream_cleanly(tmp_path, model_long):
    """Streams in flight at SIGTERM end with a finish_reason chunk and [DONE]; exit status 0.
    drain_timeout is short so the long generations are cut at the deadline, not finished."""
    conf = write_config(
        tmp_path / "b.conf",
        model=model_long,
        sections={"server": {"drain_timeout": "0.3"}, "model": {"parallel": 4}},
    )
    async with trio.open_nursery() as nursery:
        d, notify, _ = await start_notified(tmp_path, conf, nursery)
        try:
            results: list = [None] * 4
            started = [0] * 4
            async with httpx.AsyncClient(timeout=60) as client:

                async def one(i: int) -> None:
                    def seen(n: int) -> None:
                        started[i] = n

                    results[i] = await stream_completion(
                        client, d.base_url(), max_tokens=4000, on_chunk=seen
                    )

                async with trio.open_nursery() as streams:
                    for i in range(4):
                        streams.start_soon(one, i)
                    with trio.fail_after(60):
                        while min(started) < 3:
                            await trio.sleep(0.01)
                    d.signal(signal.SIGTERM)
            assert await d.wait() == 0, d.stderr
            for r in results:
                assert r.status == 200
                assert r.done, "stream ended without [DONE]"
                assert r.finish_reasons == ["length"], r.chunks[-2:]
                # The drain deadline cut them: far fewer than the 4000 tokens asked for.
                assert r.completion_tokens is not None and r.completion_tokens < 4000
            assert any(m.has("STOPPING", "1") for m in notify.messages)
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


async def test_sigterm_lets_running_generations_finish(tmp_path, model_long):
    """Within drain_timeout a running stream goes on to its end, while new connections are
    refused at once."""
    conf = write_config(
        tmp_path / "b.conf", model=model_long, sections={"server": {"drain_timeout": "60"}}
    )
    async with trio.open_nursery() as nursery:
        d, notify, _ = await start_notified(tmp_path, conf, nursery)
        try:
            seen = [0]
            result: list = []
            async with httpx.AsyncClient(timeout=60) as client:

                async def one() -> None:
                    result.append(
                        await stream_completion(
                            client,
                            d.base_url(),
                            max_tokens=2000,
                            on_chunk=lambda n: seen.__setitem__(0, n),
                        )
                    )

                async with trio.open_nursery() as streams:
                    streams.start_soon(one)
                    with trio.fail_after(60):
                        while seen[0] < 3:
                            await trio.sleep(0.01)
                    n = len(notify.messages)
                    d.signal(signal.SIGTERM)
                    await notify.wait_for(lambda m: m.has("STOPPING", "1"), after=n)
                    with trio.fail_after(30):
                        while True:  # the listener closes right after STOPPING=1
                            try:
                                with socket.create_connection(("127.0.0.1", d.port), timeout=5):
                                    pass
                            except ConnectionRefusedError:
                                break
                            await trio.sleep(0.01)
                    assert not result, "the stream ended before the listener closed"
            assert await d.wait() == 0, d.stderr
            (r,) = result
            assert r.done and r.finish_reasons == ["length"]
            assert r.completion_tokens == 2000  # all of it: the drain did not cut it
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


async def test_drain_delay_says_not_ready_while_still_serving(tmp_path, model_a):
    """[server] drain_delay: after SIGTERM /health is 503 at once, yet new connections are still
    accepted and served until the delay ends; then the listener closes and the daemon exits 0."""
    conf = write_config(
        tmp_path / "b.conf", model=model_a, sections={"server": {"drain_delay": "2"}}
    )
    async with trio.open_nursery() as nursery:
        d, notify, _ = await start_notified(tmp_path, conf, nursery)
        try:
            n = len(notify.messages)
            d.signal(signal.SIGTERM)
            await notify.wait_for(lambda m: m.has("STOPPING", "1"), after=n)
            async with httpx.AsyncClient(timeout=30) as client:  # a new connection each time
                health = await client.get(d.base_url() + "/health", headers={"connection": "close"})
                assert health.status_code == 503 and health.json()["status"] == "draining"
                r = await stream_completion(client, d.base_url(), max_tokens=8)
                assert r.done and r.finish_reasons == ["length"]  # still served
            with trio.fail_after(30):
                while True:  # the listener closes once the delay is over
                    try:
                        with socket.create_connection(("127.0.0.1", d.port), timeout=5):
                            pass
                    except ConnectionRefusedError:
                        break
                    await trio.sleep(0.05)
            assert await d.wait() == 0, d.stderr
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


async def test_a_signal_after_drain_delay_ends_generations_at_once(tmp_path, model_long):
    """After [server] drain_delay has run out and the drain began, another SIGTERM is a second
    signal: running generations end now (not after drain_timeout), cleanly."""
    conf = write_config(tmp_path / "b.conf", model=model_long,
                        sections={"server": {"drain_delay": "0.5", "drain_timeout": "600"}})
    async with trio.open_nursery() as nursery:
        d, notify, _ = await start_notified(tmp_path, conf, nursery)
        try:
            seen = [0]
            result: list = []
            async with httpx.AsyncClient(timeout=120) as client:

                async def one() -> None:
                    result.append(await stream_completion(
                        client, d.base_url(), max_tokens=100000,
                        on_chunk=lambda n: seen.__setitem__(0, n)))

                async with trio.open_nursery() as streams:
                    streams.start_soon(one)
                    with trio.fail_after(60):
                        while seen[0] < 3:
                            await trio.sleep(0.01)
                    d.signal(signal.SIGTERM)
                    with trio.fail_after(30):
                        while "draining: no new connections" not in d.stderr:
                            await trio.sleep(0.05)
                    assert not result
                    d.signal(signal.SIGTERM)
            (r,) = result
            assert r.done and r.finish_reasons == ["length"]
            assert await d.wait(60) == 0, d.stderr
            assert "second stop signal" in d.stderr
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


# ---- SIGHUP reload with a model swap -------------------------------------------------------


async def test_sighup_swaps_the_model_under_load(tmp_path, model_a, model_b):
    conf = write_config(tmp_path / "b.conf", model=model_a, sections={"model": {"parallel": 2}})
    async with trio.open_nursery() as nursery:
        d, notify, _ = await start_notified(tmp_path, conf, nursery)
        try:
            base = d.base_url()
            failures: list[str] = []
            served = {"a": 0, "b": 0}
            stop_load = trio.Event()

            async def load(client: httpx.AsyncClient, streaming: bool) -> None:
                while not stop_load.is_set():
                    if streaming:
                        r = await stream_completion(client, base, max_tokens=12)
                        if r.status != 200 or not r.done or not r.finish_reasons:
                            failures.append(f"stream: {r.status} done={r.done}")
                        continue
                    resp = await client.post(
                        base + "/v1/completions",
                        json={"prompt": "hello", "max_tokens": 8, "temperature": 0},
                    )
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code} {resp.text[:200]}")
                        continue
                    served["b" if "model-b" in resp.json()["model"] else "a"] += 1

            async with httpx.AsyncClient(timeout=60) as client, trio.open_nursery() as loaders:
                for i in range(4):
                    loaders.start_soon(load, client, i % 2 == 0)
                with trio.fail_after(60):
                    while served["a"] < 5:
                        await trio.sleep(0.02)
                # A broken configuration first: logged, ignored, still serving model a.
                write_config(conf, model=model_b, sections={"model": {"no_such_key": 1}})
                n = len(notify.messages)
                d.signal(signal.SIGHUP)
                i = await notify.wait_for(lambda m: m.has("RELOADING", "1"), after=n)
                assert int(notify.messages[i].get("MONOTONIC_USEC") or 0) > 0
                await notify.wait_for(lambda m: m.has("READY", "1"), after=i)
                r = await client.get(base + "/v1/models")
                assert r.json()["data"][0]["meta"]["path"] == model_a.name
                # Now point it at model b.
                write_config(conf, model=model_b, sections={"model": {"parallel": 2}})
                n = len(notify.messages)
                d.signal(signal.SIGHUP)
                i = await notify.wait_for(lambda m: m.has("RELOADING", "1"), after=n)
                await notify.wait_for(lambda m: m.has("READY", "1"), after=i)
                # Every request after READY=1 is answered by model b.
                r = await client.get(base + "/v1/models")
                ids = [m["id"] for m in r.json()["data"]]
                assert ids[0] == "model-b.gguf", ids
                assert r.json()["data"][0]["meta"]["path"] == model_b.name
                b_before = served["b"]
                with trio.fail_after(60):
                    while served["b"] < b_before + 5:
                        await trio.sleep(0.02)
                stop_load.set()
            assert failures == []
            assert served["a"] >= 5 and served["b"] >= 5
            freed = f"reload: previous model {model_a} freed after its last request"
            assert await trio.to_thread.run_sync(wait_until, lambda: freed in d.stderr)
            d.signal(signal.SIGUSR2)  # (signals may be taken in any order: wait for its line)
            assert await trio.to_thread.run_sync(wait_until, lambda: "status: " in d.stderr)
            d.signal(signal.SIGTERM)
            assert await d.wait() == 0
            assert "reload: configuration rejected" in d.stderr
            assert "no_such_key" in d.stderr
            assert "reload: now serving model-b.gguf" in d.stderr
            assert "status: serving" in d.stderr and "model model-b.gguf" in d.stderr
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


# ---- SIGUSR1 log reopen ---------------------------------------------------------------------


async def test_sigusr1_reopens_the_log_file(tmp_path, model_a):
    log = tmp_path / "bitnetd.log"
    conf = write_config(tmp_path / "b.conf", model=model_a, sections={"daemon": {"logfile": log}})
    async with trio.open_nursery() as nursery:
        d, _, _ = await start_notified(tmp_path, conf, nursery)
        try:
            assert "serving model-a.gguf" in log.read_text()
            os.rename(log, tmp_path / "bitnetd.log.1")
            d.signal(signal.SIGUSR1)
            assert await trio.to_thread.run_sync(wait_until, log.exists)
            d.signal(signal.SIGUSR2)
            assert await trio.to_thread.run_sync(wait_until, lambda: "status:" in log.read_text())
            d.signal(signal.SIGTERM)
            assert await d.wait() == 0
            old, new = (tmp_path / "bitnetd.log.1").read_text(), log.read_text()
            assert "serving model-a.gguf" in old and "status:" not in old
            assert "log files reopened" in new and "status: serving" in new
            assert "bitnetd stopped" in new
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


# ---- pidfile lock, -t, -v -------------------------------------------------------------------


async def test_second_instance_refuses_the_locked_pidfile(tmp_path, model_a):
    pidfile = tmp_path / "bitnetd.pid"
    conf = write_config(
        tmp_path / "b.conf", model=model_a, sections={"daemon": {"pidfile": pidfile}}
    )
    async with trio.open_nursery() as nursery:
        d, _, _ = await start_notified(tmp_path, conf, nursery)
        try:
            assert read_pidfile(pidfile) == (d.pid, True)
            second = await trio.run_process(
                [*BITNETD, "-f", "-c", str(conf)],
                env=CHILD_ENV,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
            err = second.stderr.decode()
            assert second.returncode != 0
            assert "another bitnetd is already running" in err
            assert f"pid {d.pid}" in err
            assert read_pidfile(pidfile) == (d.pid, True)  # untouched by the loser
            d.signal(signal.SIGINT)
            assert await d.wait() == 0
            assert not pidfile.exists()
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


def test_check_mode_and_version(tmp_path, model_a):
    good = write_config(tmp_path / "good.conf", model=model_a)
    r = run_bitnetd("-t", "-c", str(good), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout
    broken_model = tmp_path / "broken.gguf"
    broken_model.write_bytes(b"GGUF" + b"\0" * 60)
    bad = write_config(tmp_path / "bad.conf", model=broken_model)
    r = run_bitnetd("-t", "-c", str(bad), timeout=60)
    assert r.returncode != 0 and "[model] path" in r.stderr
    worse = tmp_path / "worse.conf"
    worse.write_text("[server]\nbacklog = -3\nlisten = nonsense\n[model]\nthreads = x\n")
    r = run_bitnetd("-t", "-c", str(worse), timeout=60)
    assert r.returncode != 0
    for key in ("backlog", "listen", "threads"):  # every problem, not just the first
        assert key in r.stderr
    r = run_bitnetd("-v", timeout=60)
    assert r.returncode == 0 and "bitnetd" in r.stdout and "0." in r.stdout


async def test_listen_option_overrides_the_file_and_survives_a_reload(tmp_path, model_a):
    """`bitnetd -f --listen 127.0.0.1:PORT` serves there (the file says port 0), also after HUP."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = write_config(tmp_path / "l.conf", model=model_a)
    d = Daemon(conf, extra_args=["--listen", f"127.0.0.1:{port}"])
    try:
        url = f"http://127.0.0.1:{port}/health"
        async with httpx.AsyncClient(timeout=10) as client:
            with trio.fail_after(60):
                while (await wait_http(url)).status_code != 200:
                    await trio.sleep(0.05)
            d.signal(signal.SIGHUP)
            assert await trio.to_thread.run_sync(
                wait_until, lambda: "configuration applied" in d.stderr
            )
            # The file's port 0 did not come back with the reload: the option still holds.
            assert "take effect at the next restart" not in d.stderr
            assert (await client.get(url)).status_code == 200
        d.signal(signal.SIGTERM)
        assert await d.wait() == 0
    finally:
        d.kill()
    r = run_bitnetd("-f", "--listen", "nonsense", "-c", str(conf), timeout=60)
    assert r.returncode == 2 and "--listen" in r.stderr and "Traceback" not in r.stderr


# ---- daemon mode, unix socket and bitnetctl ------------------------------------------------


def _ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*BITNETCTL, *args], env=CHILD_ENV, capture_output=True, text=True, timeout=120, check=False
    )


def test_daemon_mode_with_bitnetctl(tmp_path, model_a):
    pidfile, sock, log = tmp_path / "d.pid", tmp_path / "d.sock", tmp_path / "d.log"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = write_config(
        tmp_path / "d.conf",
        model=model_a,
        sections={
            "daemon": {"pidfile": pidfile, "logfile": log},
            "server": {
                "listen": f"127.0.0.1:{port}",
                "unix_socket": sock,
                "unix_socket_mode": "0600",
                "backlog": 37,
            },
        },
    )
    launcher = run_bitnetd("-c", str(conf), timeout=120)
    assert launcher.returncode == 0, launcher.stderr + log.read_text()
    pid, locked = read_pidfile(pidfile)
    try:
        assert locked and pid is not None
        # Detached: its own session, not a session leader, parent gone.
        assert os.getsid(pid) != pid
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[1] != str(os.getpid())
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        if shutil.which("ss"):
            # For a listening TCP socket, ss shows the listen(2) backlog as Send-Q.
            out = subprocess.run(
                ["ss", "-ltnH", f"sport = :{port}"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            ).stdout.split()
            assert out[0] == "LISTEN" and out[2] == "37", out
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200

        r = _ctl("-p", str(port), "-P", str(pidfile), "status")
        assert r.returncode == 0, r.stderr
        assert f"bitnetd is running (pid {pid})" in r.stdout and "model-a.gguf" in r.stdout
        done = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            timeout=30,
            json={"prompt": "hi", "max_tokens": 5, "ignore_eos": True},
        )
        assert done.status_code == 200
        r = _ctl("-U", str(sock), "-P", str(pidfile), "--json", "status")
        data = json.loads(r.stdout)
        assert r.returncode == 0 and data["pid"] == pid and data["healthy"]
        assert data["metrics"]["requests_running"] == 0  # the finished request is not counted
        assert data["metrics"]["tokens_generated_total"] >= 5
        assert data["models"][0]["id"] == "model-a.gguf"
        r = _ctl("-c", str(conf), "models")  # address, socket and pidfile from the config
        assert r.returncode == 0 and r.stdout.startswith("model-a.gguf")
        r = _ctl("-p", str(port), "metrics")
        assert r.returncode == 0 and "bitnetd_requests_total" in r.stdout
        r = _ctl("-p", str(port), "--json", "metrics")
        assert r.returncode == 0 and "bitnetd_model_loaded" in json.loads(r.stdout)
        r = _ctl("-P", str(pidfile), "reload")
        assert r.returncode == 0 and f"pid {pid}" in r.stdout
        assert wait_until(lambda: "reload: configuration applied" in log.read_text())

        r = _ctl("-P", str(pidfile), "stop")
        assert r.returncode == 0, r.stderr
        assert not pidfile.exists() and not sock.exists()
        assert not os.path.exists(f"/proc/{pid}") or _zombie_or_gone(pid)
        for cmd in ("status", "models", "metrics"):
            r = _ctl("-p", str(port), "-P", str(pidfile), cmd)
            assert r.returncode == 1 and "cannot reach bitnetd" in r.stderr
        for cmd in ("reload", "stop"):
            r = _ctl("-P", str(pidfile), cmd)
            assert r.returncode == 1 and "not running" in r.stderr
        assert "bitnetd stopped" in log.read_text()
    finally:
        if read_pidfile(pidfile)[1]:
            os.kill(pid, signal.SIGKILL)


def _zombie_or_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_daemon_mode_reports_start_failure(tmp_path, model_a):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\3\0\0\0" + b"\0" * 100)
    pidfile = tmp_path / "d.pid"
    conf = write_config(
        tmp_path / "d.conf", model=broken, sections={"daemon": {"pidfile": pidfile}}
    )
    r = run_bitnetd("-c", str(conf), timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("bitnetd: ") and "broken.gguf" in r.stderr
    assert wait_until(lambda: not pidfile.exists())


# ---- socket activation ----------------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not installed"
)
async def test_socket_activation(tmp_path, model_a):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        activated = s.getsockname()[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        configured = s.getsockname()[1]
    sock = tmp_path / "not-used.sock"
    conf = write_config(
        tmp_path / "b.conf",
        model=model_a,
        sections={"server": {"listen": f"127.0.0.1:{configured}", "unix_socket": sock}},
    )
    notify = NotifySocket.bind(tmp_path, abstract=True)
    env = {"NOTIFY_SOCKET": notify.address}
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{activated}", "--fdname=http"]
    for key in ("PYTHONPATH", "PYTHONUNBUFFERED", "NOTIFY_SOCKET"):
        cmd.append(f"-E{key}")
    d = Daemon(conf, argv=cmd + BITNETD, env=env)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notify.collect)
        try:
            # The first connection starts bitnetd; it waits in the backlog while the model loads.
            r = await wait_http(f"http://127.0.0.1:{activated}/health")
            assert r.status_code == 200
            ready = await notify.wait_for(lambda m: m.has("READY", "1"))
            status = notify.messages[ready].get("STATUS") or ""
            assert f"127.0.0.1:{activated} (fd 3, http)" in status
            # [server] listen and unix_socket were not used.
            with socket.socket() as c, pytest.raises(ConnectionRefusedError):
                c.connect(("127.0.0.1", configured))
            assert not sock.exists()
            d.signal(signal.SIGTERM)  # systemd-socket-activate exec'd bitnetd: same pid
            assert await d.wait() == 0, d.stderr
            assert "socket activation: using 1 inherited socket" in d.stderr
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


# ---- privilege drop -------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
async def test_privilege_drop_to_nobody(tmp_path, model_a):
    # nobody must be able to reach the model and the log file; tmp_path itself is root-only.
    # Its run directory belongs to nobody (as /run/bitnetd belongs to bitnetd), so the pidfile
    # and the unix socket can be removed at exit after the drop.
    shared = Path("/tmp") / f"bitnetd-drop-{os.getpid()}"
    shared.mkdir(mode=0o755, exist_ok=True)
    os.chown(shared, 65534, 65534)
    try:
        model = shared / "model.gguf"
        shutil.copy(model_a, model)
        model.chmod(0o644)
        log, pidfile, sock = shared / "bitnetd.log", shared / "bitnetd.pid", shared / "b.sock"
        conf = write_config(
            tmp_path / "b.conf",
            model=model,
            sections={
                "daemon": {
                    "user": "nobody",
                    "group": "nogroup",
                    "logfile": log,
                    "pidfile": pidfile,
                },
                "server": {"unix_socket": sock},
            },
        )
        async with trio.open_nursery() as nursery:
            d, _, _ = await start_notified(tmp_path, conf, nursery)
            try:
                ids = read_proc_ids(d.pid)
                assert len(ids) >= 2  # the inference thread (and engine workers) too
                for tid, uid, gid in ids:
                    assert uid == [65534] * 4, (tid, uid)
                    assert gid == [65534] * 4, (tid, gid)
                status = await trio.Path(f"/proc/{d.pid}/status").read_text()
                groups = next(
                    line for line in status.splitlines() if line.startswith("Groups:")
                ).split()[1:]
                assert "0" not in groups  # root's supplementary groups are gone too
                st = os.stat(sock)  # unix_socket_owner defaults to the daemon's user
                assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (65534, 65534, 0o660)
                assert read_pidfile(pidfile) == (d.pid, True)
                async with httpx.AsyncClient(timeout=30) as client:
                    r = await client.post(
                        d.base_url() + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}
                    )
                    assert r.status_code == 200, r.text
                d.signal(signal.SIGUSR1)  # the log file was handed to nobody: reopen works
                assert await trio.to_thread.run_sync(
                    wait_until, lambda: "log files reopened" in log.read_text()
                )
                d.signal(signal.SIGTERM)
                assert await d.wait() == 0, d.stderr
                assert "running as user nobody group nogroup" in log.read_text()
                assert not pidfile.exists() and not sock.exists()
            finally:
                d.kill()
                nursery.cancel_scope.cancel()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# ---- the unit's sandbox: NoNewPrivileges, MemoryDenyWriteExecute, SystemCallFilter, ... ------

# Applies to itself what bitnetd.service asks systemd for, as far as a process can without
# systemd as PID 1, then execs the rest of its command line:
#   NoNewPrivileges=yes           -> prctl(PR_SET_NO_NEW_PRIVS)
#   MemoryDenyWriteExecute=yes    -> prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN) (Linux >= 6.3)
#   SystemCallFilter=@...         -> a libseccomp allow-list, EPERM otherwise
#   RestrictAddressFamilies=...   -> socket() allowed only for those families
_SANDBOX_EXEC = r"""
import ctypes, json, os, sys
spec = json.loads(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(38, 1, 0, 0, 0) != 0:
    sys.exit(76)
if libc.prctl(65, 1, 0, 0, 0) != 0:
    sys.exit(77)
if spec["syscalls"]:
    sc = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    sc.seccomp_init.restype = ctypes.c_void_p
    sc.seccomp_init.argtypes = [ctypes.c_uint32]
    sc.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                    ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    sc.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                          ctypes.c_uint, ctypes.POINTER(Cmp)]
    sc.seccomp_load.argtypes = [ctypes.c_void_p]
    ALLOW, EPERM = 0x7FFF0000, 0x00050000 | 1
    ctx = sc.seccomp_init(EPERM)
    for name in spec["syscalls"]:
        nr = sc.seccomp_syscall_resolve_name(name.encode())
        if nr >= 0 and name != "socket":
            assert sc.seccomp_rule_add_array(ctx, ALLOW, nr, 0, None) == 0, name
    nr = sc.seccomp_syscall_resolve_name(b"socket")
    for family in spec["families"]:
        cmp = Cmp(0, 4, family, 0)  # SCMP_CMP_EQ on the first argument
        assert sc.seccomp_rule_add_array(ctx, ALLOW, nr, 1, ctypes.byref(cmp)) == 0
    if sc.seccomp_load(ctx) != 0:
        sys.exit(78)
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def _unit_setting(key: str) -> str:
    for line in (
        (Path(__file__).resolve().parents[1] / "conf" / "bitnetd.service").read_text().splitlines()
    ):
        if line.startswith(key + "="):
            return line.split("=", 1)[1].strip()
    raise KeyError(key)


def _expand_syscall_group(group: str, seen: set[str]) -> set[str]:
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", group],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("@"):
            if item not in seen:
                seen.add(item)
                names |= _expand_syscall_group(item, seen)
        else:
            names.add(item)
    return names


def _sandbox_spec() -> dict:
    syscalls: set[str] = set()
    have_seccomp = shutil.which("systemd-analyze") is not None and any(
        Path(d, "libseccomp.so.2").exists()
        for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib/x86_64-linux-gnu")
    )
    if have_seccomp:
        for item in _unit_setting("SystemCallFilter").split():
            syscalls |= _expand_syscall_group(item, {item}) if item.startswith("@") else {item}
    families = [
        int(getattr(socket, name)) for name in _unit_setting("RestrictAddressFamilies").split()
    ]
    return {"syscalls": sorted(syscalls), "families": families}


async def test_serves_inside_the_units_sandbox(tmp_path, model_a, model_b):
    """Start, generate, reload to another model and drain with the unit's hardening applied
    (MemoryDenyWriteExecute: nothing in the process may map W+X memory)."""
    spec = _sandbox_spec()
    probe = await trio.run_process(
        [sys.executable, "-c", _SANDBOX_EXEC, json.dumps(spec), "-c", "pass"],
        env=CHILD_ENV,
        check=False,
    )
    if probe.returncode == 77:
        pytest.skip("PR_SET_MDWE not available (Linux < 6.3)")
    assert probe.returncode == 0
    netlink = (
        "import socket\ntry:\n socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\n"
        "except PermissionError:\n print('denied')"
    )
    check = await trio.run_process(
        [sys.executable, "-c", _SANDBOX_EXEC, json.dumps(spec), "-c", netlink],
        env=CHILD_ENV,
        capture_stdout=True,
        check=False,
    )
    if spec["syscalls"]:
        assert check.stdout.decode().strip() == "denied"  # the filter is really in force
    conf = write_config(tmp_path / "b.conf", model=model_a)
    async with trio.open_nursery() as nursery:
        notify = NotifySocket.bind(tmp_path, abstract=True)
        nursery.start_soon(notify.collect)
        d = Daemon(
            conf,
            argv=[sys.executable, "-c", _SANDBOX_EXEC, json.dumps(spec), *BITNETD[1:]],
            env={"NOTIFY_SOCKET": notify.address},
        )
        try:
            ready = await notify.wait_for(lambda m: m.has("READY", "1"), timeout=120)
            d.set_port_from_status(notify.messages[ready].get("STATUS") or "")
            async with httpx.AsyncClient(timeout=30) as client:
                r = await stream_completion(client, d.base_url(), max_tokens=16)
                assert r.done and r.finish_reasons == ["length"]
                write_config(conf, model=model_b)
                n = len(notify.messages)
                d.signal(signal.SIGHUP)
                i = await notify.wait_for(lambda m: m.has("RELOADING", "1"), after=n)
                await notify.wait_for(lambda m: m.has("READY", "1"), after=i)
                models = (await client.get(d.base_url() + "/v1/models")).json()
                assert models["data"][0]["id"] == "model-b.gguf"
                r = await stream_completion(client, d.base_url(), max_tokens=16)
                assert r.done and r.finish_reasons == ["length"]
            d.signal(signal.SIGTERM)
            assert await d.wait() == 0, d.stderr
            assert "not permitted" not in d.stderr and "Traceback" not in d.stderr
        finally:
            d.kill()
            nursery.cancel_scope.cancel()


# ---- hypercorn's own command ----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("hypercorn") is None, reason="hypercorn command not installed")
async def test_hypercorn_command_with_conf_toml(tmp_path, model_a):
    """`hypercorn -k trio -c conf/hypercorn.toml bitnetd_trio.app:app`, with the configuration
    file from BITNETD_CONFIG."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = write_config(tmp_path / "b.conf", model=model_a)
    toml = Path(__file__).resolve().parents[1] / "conf" / "hypercorn.toml"
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; polled below
        [
            shutil.which("hypercorn"),
            "-k",
            "trio",
            "-c",
            str(toml),
            "-b",
            f"127.0.0.1:{port}",
            "bitnetd_trio.app:app",
        ],
        env={**CHILD_ENV, "BITNETD_CONFIG": str(conf)},
        cwd=str(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with trio.fail_after(120):
            while True:
                r = await wait_http(f"http://127.0.0.1:{port}/health")
                if r.status_code == 200:
                    break
                await trio.sleep(0.05)
        async with httpx.AsyncClient(timeout=30) as client:
            models = (await client.get(f"http://127.0.0.1:{port}/v1/models")).json()
            assert models["data"][0]["id"] == "model-a.gguf"
            res = await stream_completion(client, f"http://127.0.0.1:{port}", max_tokens=8)
            assert res.done and res.finish_reasons == ["length"]
        proc.send_signal(signal.SIGTERM)  # default worker: the parent stops its child cleanly
        with trio.fail_after(60):
            while proc.poll() is None:
                await trio.sleep(0.05)
        assert proc.returncode == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("hypercorn") is None, reason="hypercorn command not installed")
@pytest.mark.parametrize("broken", ["config", "model"])
def test_hypercorn_command_start_failure_is_one_line(tmp_path, broken):
    """A bad configuration or model under `hypercorn ... bitnetd_trio.app:app`: one line that
    says why, no traceback, and the worker's status 2 (hypercorn's supervisor drops a worker's
    status, so the in-process runner `-w 0` shows it)."""
    env = dict(CHILD_ENV)
    if broken == "config":
        env["BITNETD_SERVER_BACKLOG"] = "-3"
        why = "backlog"
    else:
        bad = tmp_path / "bad.gguf"
        bad.write_bytes(b"GGUF" + b"\0" * 60)
        env["BITNETD_MODEL_PATH"] = str(bad)
        why = "bad.gguf"
    for workers in ("1", "0"):
        proc = subprocess.run(
            [shutil.which("hypercorn"), "-k", "trio", "-w", workers, "-b", "127.0.0.1:0",
             "bitnetd_trio.app:app"],
            env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=120, check=False,
        )
        out = proc.stdout + proc.stderr
        assert "Traceback" not in out, out
        assert why in out, out
        if workers == "0":
            assert proc.returncode == 2, out
