"""Replicas behind a standard load balancer, on loopback: 3 bitnetd daemons, the balancer run
with the configuration in deploy/ (only the addresses replaced), 8 clients streaming for 20 s
while one daemon is drained with SIGTERM and started again: no client request may fail.

Runs once per balancer whose binary is installed (nginx, HAProxy); skipped at once elsewhere.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio
from daemon_harness import Daemon, stream_completion, wait_http, write_config

from bitnetd_trio.engine import gguf_writer as gw

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "deploy" / "nginx" / "bitnetd.conf"
HAPROXY_CFG = REPO / "deploy" / "haproxy" / "haproxy.cfg"

CLIENTS = 8
DURATION = 20.0  # seconds of client traffic
DRAIN_AT = 4.0  # seconds into the run


def _binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None)


NGINX = _binary("nginx")
HAPROXY = _binary("haproxy")

pytestmark = pytest.mark.load_balancer


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def nginx_config(tmp: Path, listen: int, backends: list[int]) -> Path:
    """deploy/nginx/bitnetd.conf with loopback addresses, inside a minimal main context."""
    site = NGINX_CONF.read_text()
    servers = re.findall(r"^    server \S+:8080 (.*);$", site, flags=re.M)
    assert len(servers) == 3, "the template lists 3 replicas"
    site = re.sub(r"^    server \S+:8080 .*;\n", "", site, flags=re.M)
    lines = "".join(f"    server 127.0.0.1:{p} {servers[0]};\n" for p in backends)
    site = site.replace("    least_conn;\n", "    least_conn;\n" + lines, 1)
    site, n = re.subn(r"^    listen 80;$", f"    listen 127.0.0.1:{listen};", site, flags=re.M)
    assert n == 1
    for d in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp / d).mkdir(exist_ok=True)
    conf = tmp / "nginx.conf"
    conf.write_text(
        "daemon off;\nmaster_process off;\n"
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log info;\n"
        "events { worker_connections 1024; }\n"
        "http {\n"
        f"  access_log {tmp}/access.log;\n"
        f"  client_body_temp_path {tmp}/body;\n  proxy_temp_path {tmp}/proxy;\n"
        f"  fastcgi_temp_path {tmp}/fastcgi;\n  uwsgi_temp_path {tmp}/uwsgi;\n"
        f"  scgi_temp_path {tmp}/scgi;\n"
        + site
        + "}\n"
    )
    return conf


def haproxy_config(tmp: Path, listen: int, backends: list[int]) -> Path:
    """deploy/haproxy/haproxy.cfg with loopback addresses."""
    cfg = HAPROXY_CFG.read_text()
    cfg, n = re.subn(r"^    bind :80$", f"    bind 127.0.0.1:{listen}", cfg, flags=re.M)
    assert n == 1
    names = re.findall(r"^    server (\S+) \S+:8080 check$", cfg, flags=re.M)
    assert len(names) == 3
    for name, port in zip(names, backends, strict=True):
        cfg = re.sub(rf"^    server {name} \S+:8080 check$",
                     f"    server {name} 127.0.0.1:{port} check", cfg, flags=re.M)
    path = tmp / "haproxy.cfg"
    path.write_text(cfg)
    return path


def _retries(balancer: str, tmp: Path, lb_log: Path) -> float:
    """Requests the balancer sent to another replica after a failed attempt (from its logs)."""
    if balancer == "nginx":
        text = (tmp / "error.log").read_text(errors="replace")
        return float(len(re.findall(r"while connecting to upstream|prematurely closed|"
                                    r"reset by peer", text)))
    # HAProxy's httplog: "... actconn/feconn/beconn/srv_conn/retries ..."; "+N": redispatched
    counts = re.findall(r" \d+/\d+/\d+/\d+/\+?(\d+) \d+/\d+ ", lb_log.read_text())
    return float(sum(1 for n in counts if int(n) > 0))


@dataclasses.dataclass
class Tally:
    ok: int = 0
    failed: list[str] = dataclasses.field(default_factory=list)
    tokens: int = 0


@pytest.mark.parametrize("balancer", [
    pytest.param("nginx", marks=pytest.mark.skipif(NGINX is None, reason="no nginx binary")),
    pytest.param("haproxy",
                 marks=pytest.mark.skipif(HAPROXY is None, reason="no haproxy binary")),
])
async def test_drain_and_restart_behind_balancer(balancer: str, tmp_path: Path) -> None:
    model = gw.write_model(tmp_path / "m.gguf", dataclasses.replace(gw.TINY, n_ctx=4096), 0)
    front, *ports = _free_ports(4)
    configs = [
        write_config(tmp_path / f"d{i}.conf", model=model, sections={
            "model": {"threads": 1, "parallel": 4},
            "server": {"listen": f"127.0.0.1:{port}", "drain_timeout": 10},
        })
        for i, port in enumerate(ports)
    ]
    daemons = [Daemon(c) for c in configs]
    lb: subprocess.Popen | None = None
    lb_log = tmp_path / "balancer.log"
    passed = False
    try:
        for d, port in zip(daemons, ports, strict=True):
            d.port = port
        for d in daemons:
            r = await wait_http(d.base_url() + "/health", timeout=60)
            while r.status_code != 200:
                await trio.sleep(0.05)
                r = await wait_http(d.base_url() + "/health")
        tmp = tmp_path / balancer
        tmp.mkdir()
        if balancer == "nginx":
            conf = nginx_config(tmp, front, ports)
            argv = [NGINX, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / "error.log")]
        else:
            conf = haproxy_config(tmp, front, ports)
            argv = [HAPROXY, "-db", "-f", str(conf)]
        with lb_log.open("w") as log:
            lb = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{front}"
        await wait_http(base + "/health", timeout=30)

        tally = Tally()
        figures: dict[str, float] = {}
        stop_at = trio.current_time() + DURATION

        async def client(i: int) -> None:
            n = 0
            async with httpx.AsyncClient(timeout=60) as c:
                while trio.current_time() < stop_at:
                    max_tokens = 150 + 97 * ((i + n) % 7)
                    n += 1
                    try:
                        res = await stream_completion(c, base, max_tokens=max_tokens,
                                                      prompt=f"client {i} request {n}")
                    except (httpx.HTTPError, ValueError) as exc:
                        tally.failed.append(f"client {i}: {type(exc).__name__}: {exc}")
                        continue
                    if res.status != 200 or not res.done:
                        tally.failed.append(f"client {i}: status {res.status}, done {res.done}")
                    elif res.completion_tokens != max_tokens:
                        tally.failed.append(
                            f"client {i}: {res.completion_tokens} of {max_tokens} tokens "
                            f"({res.finish_reasons})")
                    else:
                        tally.ok += 1
                        tally.tokens += max_tokens

        async def drain_and_restart() -> None:
            await trio.sleep(DRAIN_AT)
            victim = daemons[0]
            # Signal while the victim has a stream running (least-connections balancing can
            # leave one replica idle for a moment): the drain must have something to finish.
            async with httpx.AsyncClient() as c:
                with trio.move_on_after(10):
                    while True:
                        m = (await c.get(victim.base_url() + "/metrics")).text
                        running = re.search(r"^bitnetd_requests_running (\S+)$", m, flags=re.M)
                        if running and float(running.group(1)) >= 1:
                            break
                        await trio.sleep(0.01)
            figures["running_at_sigterm"] = float(running.group(1)) if running else -1
            t0 = trio.current_time()
            victim.signal(signal.SIGTERM)
            figures["exit_code"] = await victim.wait(timeout=30)
            figures["drain_seconds"] = trio.current_time() - t0
            figures["victim_stopped_cleanly"] = float("bitnetd stopped" in victim.stderr)
            t1 = trio.current_time()
            daemons[0] = Daemon(configs[0])
            daemons[0].port = ports[0]
            r = await wait_http(daemons[0].base_url() + "/health", timeout=60)
            while r.status_code != 200:
                await trio.sleep(0.05)
                r = await wait_http(daemons[0].base_url() + "/health")
            figures["restart_to_ready_seconds"] = trio.current_time() - t1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(drain_and_restart)
            for i in range(CLIENTS):
                nursery.start_soon(client, i)

        # Did the restarted replica get work again? (informative: nginx keeps a failed
        # replica out for fail_timeout)
        async with httpx.AsyncClient() as c:
            m = (await c.get(daemons[0].base_url() + "/metrics")).text
        served = re.search(r"^bitnetd_tokens_generated_total (\S+)$", m, flags=re.M)
        figures["restarted_replica_tokens"] = float(served.group(1)) if served else -1
        figures["retried"] = _retries(balancer, tmp, lb_log)
        print(f"\n{balancer}: {tally.ok} streams ok, {len(tally.failed)} failed, "
              f"{tally.tokens} tokens; {figures}")
        assert tally.failed == [], tally.failed[:10]
        assert tally.ok >= CLIENTS * 5
        assert figures["exit_code"] == 0 and figures["victim_stopped_cleanly"] == 1.0
        assert figures["running_at_sigterm"] >= 1  # the drain had streams to finish
        passed = True
    finally:
        if lb is not None:
            lb.terminate()
            try:
                lb.wait(10)
            except subprocess.TimeoutExpired:
                lb.kill()
        for d in daemons:
            d.kill()
        if not passed and lb_log.exists():
            print(lb_log.read_text()[-3000:])


def test_balancer_configs_say_what_the_readme_says() -> None:
    """The settings the README and the drain sequence rely on are in both files."""
    nginx = NGINX_CONF.read_text()
    for needle in ("least_conn;", "proxy_buffering off;", "proxy_http_version 1.1;",
                   "proxy_next_upstream error timeout http_503 non_idempotent;",
                   "max_fails=3 fail_timeout=10s", "proxy_read_timeout 660s;"):
        assert needle in nginx, needle
    haproxy = HAPROXY_CFG.read_text()
    for needle in ("balance leastconn", "option httpchk", "http-check send meth GET uri /health",
                   "http-check expect status 200", "option redispatch",
                   "retry-on conn-failure empty-response 503"):
        assert needle in haproxy, needle
    if NGINX is not None:
        with_main = f"events {{}}\nhttp {{\n{NGINX_CONF.read_text()}\n}}\n"
        test_conf = Path(f"/tmp/bitnetd-nginx-syntax-{time.time_ns()}.conf")
        test_conf.write_text(with_main.replace("listen 80;", "listen 127.0.0.1:1;"))
        try:
            proc = subprocess.run([NGINX, "-t", "-c", str(test_conf), "-e", "/dev/null"],
                                  capture_output=True, text=True, timeout=30, check=False)
        finally:
            test_conf.unlink()
        assert proc.returncode == 0, proc.stderr
    if HAPROXY is not None:
        proc = subprocess.run([HAPROXY, "-c", "-f", str(HAPROXY_CFG)],
                              capture_output=True, text=True, timeout=30, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
