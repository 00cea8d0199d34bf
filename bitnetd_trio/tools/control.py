"""bitnetctl: talk to a running bitnetd over HTTP (TCP or its unix socket) and its pidfile.

    bitnetctl [-c FILE] [-H host] [-p port] [-U unix_socket] [-P pidfile] [--json]
              [--tls] [--cacert FILE] [--insecure] status|models|metrics|reload|stop

Exit status: 0 success; 1 the daemon is not running or cannot be reached; 2 usage error;
3 the daemon answered with an error (e.g. /health is 503 while the model loads).
Only the standard library is used for the transport (http.client), so the tool works on a
host where nothing else of the project's stack would.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import ssl
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bitnetd_trio.daemon.unix import read_pidfile

__all__ = ["ControlError", "Endpoint", "UnixHTTPConnection", "main"]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_PIDFILE = "/run/bitnetd/bitnetd.pid"
DEFAULT_TIMEOUT = 10.0

EXIT_OK, EXIT_DOWN, EXIT_USAGE, EXIT_ERROR = 0, 1, 2, 3


class ControlError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTPConnection over an AF_UNIX stream socket (the Host header stays 'localhost')."""

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


@dataclass
class Endpoint:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    unix_socket: str | None = None
    api_key: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    tls: bool = False  # https (the daemon's [server] tls_cert)
    cacert: str | None = None  # PEM file of the CA (or self-signed certificate) to trust
    insecure: bool = False  # https without checking the certificate (curl's -k)

    def __str__(self) -> str:
        if self.unix_socket:
            return f"unix:{self.unix_socket}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _tls_context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.cacert)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            raise ControlError(f"cannot use --cacert {self.cacert}: {reason}", EXIT_USAGE) from None
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def get(self, path: str) -> Response:
        """GET path; ControlError(EXIT_DOWN) when nothing answers."""
        conn: http.client.HTTPConnection
        if self.unix_socket:
            conn = UnixHTTPConnection(self.unix_socket, timeout=self.timeout)
        elif self.tls:
            conn = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.timeout, context=self._tls_context()
            )
        else:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        headers = {"Accept": "application/json, text/plain;q=0.9", "User-Agent": "bitnetctl"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            return Response(resp.status, resp.getheader("Content-Type") or "", body)
        except (OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise ControlError(f"cannot reach bitnetd at {self}: {reason}", EXIT_DOWN) from None
        finally:
            conn.close()


# ---- helpers -------------------------------------------------------------------------------


def _parse_prometheus(text: str) -> dict[str, list[dict[str, Any]]]:
    """Sample lines of the Prometheus text format -> {name: [{"labels": {...}, "value": v}]}.

    Enough for bitnetctl's summaries; labels with escaped quotes are handled, timestamps ignored.
    """
    result: dict[str, list[dict[str, Any]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labels: dict[str, str] = {}
        if "{" in line:
            name, _, rest = line.partition("{")
            try:
                labels, value_text = _split_labels(rest)
            except (ValueError, IndexError):
                continue  # a malformed line: skip it rather than fail the whole command
        else:
            name, _, value_text = line.partition(" ")
        value_text = value_text.strip().split(" ")[0]
        try:
            value = float(value_text)
        except ValueError:
            continue
        result.setdefault(name.strip(), []).append({"labels": labels, "value": value})
    return result


def _split_labels(rest: str) -> tuple[dict[str, str], str]:
    labels: dict[str, str] = {}
    i = 0
    while i < len(rest) and rest[i] != "}":
        eq = rest.index("=", i)
        key = rest[i:eq].strip().lstrip(",").strip()
        j = eq + 2  # skip ="
        chars = []
        while rest[j] != '"':
            if rest[j] == "\\":
                j += 1
                chars.append({"n": "\n"}.get(rest[j], rest[j]))
            else:
                chars.append(rest[j])
            j += 1
        labels[key] = "".join(chars)
        i = j + 1
        while i < len(rest) and rest[i] in ", ":
            i += 1
    return labels, rest[i + 1 :]


def _metric_sum(metrics: dict[str, list[dict[str, Any]]], name: str) -> float | None:
    samples = metrics.get(name)
    if not samples:
        return None
    return sum(s["value"] for s in samples)


def _process_uptime(pid: int) -> float | None:
    """Seconds since the process started (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 overall, counted after "pid (comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def _format_duration(seconds: float) -> str:
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h}h {m}m"
    if h:
        return f"{h}h {m}m {s}s"
    if m:
        return f"{m}m {s}s"
    return f"{s}s"


def _process_alive(pid: int) -> bool:
    """True while pid runs (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _daemon_pid(pidfile: str) -> int:
    """The pid of the running daemon from its pidfile; ControlError(EXIT_DOWN) otherwise."""
    try:
        pid, locked = read_pidfile(pidfile)
    except OSError as exc:
        raise ControlError(f"cannot read pidfile {pidfile}: {exc.strerror}", EXIT_DOWN) from None
    if pid is None and not locked:
        raise ControlError(f"bitnetd is not running (no pidfile {pidfile})", EXIT_DOWN)
    if not locked:
        raise ControlError(
            f"bitnetd is not running (pidfile {pidfile} is stale: nobody holds its lock)", EXIT_DOWN
        )
    if pid is None:
        raise ControlError(f"pidfile {pidfile} is locked but holds no pid", EXIT_ERROR)
    return pid


def _local_pid(pidfile: str | None) -> int | None:
    if not pidfile:
        return None
    try:
        pid, locked = read_pidfile(pidfile)
    except OSError:
        return None
    return pid if locked else None


# ---- commands ------------------------------------------------------------------------------


def cmd_status(ep: Endpoint, args: argparse.Namespace) -> tuple[int, Any, str]:
    health = ep.get("/health")
    try:
        health_body = health.json()
    except ValueError:
        health_body = {"raw": health.body.decode("utf-8", "replace")}
    healthy = health.status == 200
    info: dict[str, Any] = {
        "running": True,
        "healthy": healthy,
        "endpoint": str(ep),
        "health": health_body,
    }
    pid = _local_pid(args.pidfile)
    if pid is not None:
        info["pid"] = pid
        up = _process_uptime(pid)
        if up is not None:
            info["uptime_seconds"] = round(up, 1)
    models: list[dict[str, Any]] = []
    try:
        mr = ep.get("/v1/models")
        if mr.status == 200:
            models = mr.json().get("data", [])
    except (ControlError, ValueError, AttributeError):
        pass
    info["models"] = models
    summary: dict[str, float] = {}
    try:
        metr = ep.get("/metrics")
        if metr.status == 200:
            parsed = _parse_prometheus(metr.body.decode("utf-8", "replace"))
            for key, name in (
                ("active_connections", "bitnetd_active_connections"),
                ("requests_running", "bitnetd_requests_running"),
                ("requests_waiting", "bitnetd_requests_waiting"),
                ("requests_total", "bitnetd_requests_total"),
                ("tokens_generated_total", "bitnetd_tokens_generated_total"),
                ("prompt_tokens_total", "bitnetd_prompt_tokens_total"),
                ("errors_total", "bitnetd_errors_total"),
                ("model_loaded", "bitnetd_model_loaded"),
            ):
                v = _metric_sum(parsed, name)
                if v is not None:
                    summary[key] = v
    except ControlError:
        pass
    info["metrics"] = summary

    lines = [
        f"bitnetd is {'running' if healthy else 'up but not ready'}"
        + (f" (pid {pid})" if pid is not None else "")
    ]
    lines.append(f"  endpoint:     {ep}")
    health_word = health_body.get("status", "") if isinstance(health_body, dict) else ""
    lines.append(f"  health:       {health.status} {health_word}".rstrip())
    if "uptime_seconds" in info:
        lines.append(f"  uptime:       {_format_duration(info['uptime_seconds'])}")
    for m in models:
        meta = m.get("meta") or {}
        extra = []
        for k in ("path", "n_ctx_train", "n_params", "architecture"):
            if k in meta:
                extra.append(f"{k}={meta[k]}")
        lines.append(f"  model:        {m.get('id')}" + (f" ({', '.join(extra)})" if extra else ""))

    def fmt(v: float) -> str:
        return str(int(v)) if float(v).is_integer() else f"{v:.2f}"

    if summary:
        if "active_connections" in summary:
            lines.append(f"  connections:  {fmt(summary['active_connections'])}")
        if "requests_running" in summary or "requests_waiting" in summary:
            lines.append(
                f"  requests:     {fmt(summary.get('requests_running', 0))} running, "
                f"{fmt(summary.get('requests_waiting', 0))} waiting, "
                f"{fmt(summary.get('requests_total', 0))} HTTP requests answered"
            )
        if "tokens_generated_total" in summary:
            lines.append(
                f"  tokens:       {fmt(summary['tokens_generated_total'])} generated, "
                f"{fmt(summary.get('prompt_tokens_total', 0))} prompt"
            )
    return (EXIT_OK if healthy else EXIT_ERROR), info, "\n".join(lines)


def cmd_models(ep: Endpoint, args: argparse.Namespace) -> tuple[int, Any, str]:
    r = ep.get("/v1/models")
    try:
        body = r.json()
    except ValueError:
        raise ControlError(
            f"/v1/models answered {r.status} with a non-JSON body", EXIT_ERROR
        ) from None
    if r.status != 200:
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else None
        raise ControlError(f"/v1/models answered {r.status}: {msg or body}", EXIT_ERROR)
    lines = []
    for m in body.get("data", []):
        lines.append(str(m.get("id")))
        for k, v in sorted((m.get("meta") or {}).items()):
            lines.append(f"  {k}: {v}")
    return EXIT_OK, body, "\n".join(lines) if lines else "(no models)"


def cmd_metrics(ep: Endpoint, args: argparse.Namespace) -> tuple[int, Any, str]:
    r = ep.get("/metrics")
    text = r.body.decode("utf-8", "replace")
    if r.status != 200:
        raise ControlError(f"/metrics answered {r.status}: {text.strip()[:200]}", EXIT_ERROR)
    return EXIT_OK, _parse_prometheus(text), text.rstrip("\n")


def _signal_daemon(pidfile: str, signum: signal.Signals) -> int:
    """Send signum to the daemon named by the pidfile; its pid."""
    pid = _daemon_pid(pidfile)
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        raise ControlError(f"bitnetd (pid {pid}) is not running", EXIT_DOWN) from None
    except PermissionError:
        raise ControlError(
            f"not allowed to signal bitnetd (pid {pid}): run as its user or root", EXIT_ERROR
        ) from None
    return pid


def cmd_reload(ep: Endpoint, args: argparse.Namespace) -> tuple[int, Any, str]:
    pid = _signal_daemon(args.pidfile, signal.SIGHUP)
    return (
        EXIT_OK,
        {"signal": "SIGHUP", "pid": pid},
        f"sent SIGHUP to bitnetd (pid {pid}): reloading",
    )


def cmd_stop(ep: Endpoint, args: argparse.Namespace) -> tuple[int, Any, str]:
    pid = _signal_daemon(args.pidfile, signal.SIGTERM)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        # The daemon releases its pidfile lock as the last step before exiting; then the
        # process itself must be gone (or a zombie waiting for its parent).
        _, locked = read_pidfile(args.pidfile)
        if not locked and not _process_alive(pid):
            return (
                EXIT_OK,
                {"signal": "SIGTERM", "pid": pid, "stopped": True},
                f"bitnetd (pid {pid}) stopped",
            )
        time.sleep(0.05)
    raise ControlError(
        f"sent SIGTERM to bitnetd (pid {pid}) but it is still running after {args.wait:g} s",
        EXIT_ERROR,
    )


COMMANDS = {
    "status": cmd_status,
    "models": cmd_models,
    "metrics": cmd_metrics,
    "reload": cmd_reload,
    "stop": cmd_stop,
}


def _defaults_from_config(path: str | None) -> dict[str, Any]:
    """Endpoint and pidfile defaults from a bitnetd configuration file (-c or BITNETD_CONFIG)."""
    if not path:
        return {}
    from bitnetd_trio.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        raise ControlError(f"{path}: " + "; ".join(exc.problems), EXIT_USAGE) from None
    except OSError as exc:
        raise ControlError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    out: dict[str, Any] = {}
    if cfg.daemon.pidfile:
        out["pidfile"] = cfg.daemon.pidfile
    if cfg.server.unix_socket:
        out["unix_socket"] = cfg.server.unix_socket
    if cfg.server.listen:
        from bitnetd_trio.daemon.listeners import parse_listen_address

        _, host, port = parse_listen_address(cfg.server.listen[0])
        if host in ("0.0.0.0",):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        out["host"], out["port"] = host, port
    if cfg.server.api_keys:
        out["api_key"] = cfg.server.api_keys[0]
    if cfg.server.tls_cert:
        out["tls"] = True
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bitnetctl",
        description="Query and control a running bitnetd.",
        epilog="exit status: 0 ok, 1 daemon not running or unreachable, 2 usage, 3 daemon error",
    )
    p.add_argument(
        "-c",
        "--config",
        help="read host, port, unix socket and pidfile from this "
        "bitnetd configuration file (default: $BITNETD_CONFIG if set)",
    )
    p.add_argument("-H", "--host", help=f"daemon address (default {DEFAULT_HOST})")
    p.add_argument("-p", "--port", type=int, help=f"daemon port (default {DEFAULT_PORT})")
    p.add_argument("-U", "--unix-socket", help="talk HTTP over this unix socket instead of TCP")
    p.add_argument(
        "-P", "--pidfile", help=f"the daemon's pidfile, for reload/stop (default {DEFAULT_PIDFILE})"
    )
    p.add_argument(
        "-k", "--api-key", help="bearer token if the daemon requires one (default $BITNETD_API_KEY)"
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--tls", action="store_true", help="speak https (default when the configuration sets "
        "[server] tls_cert; implied by --cacert and --insecure)"
    )
    p.add_argument("--cacert", metavar="FILE", help="trust the CA certificate(s) in this PEM file")
    p.add_argument(
        "--insecure", action="store_true", help="https without checking the daemon's certificate"
    )
    p.add_argument(
        "-t", "--timeout", type=float, default=DEFAULT_TIMEOUT, help="HTTP timeout in seconds"
    )
    p.add_argument(
        "-w",
        "--wait",
        type=float,
        default=60.0,
        help="stop: seconds to wait for the daemon to exit (default 60)",
    )
    p.add_argument(
        "command",
        choices=sorted(COMMANDS),
        metavar="command",
        help="status | models | metrics | reload | stop",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except BrokenPipeError:
        # The reader went away (`bitnetctl --json metrics | head`): not an error of ours. Point
        # stdout at /dev/null so the interpreter's final flush does not fail a second time.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


def _run(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        defaults = _defaults_from_config(args.config or os.environ.get("BITNETD_CONFIG"))
    except ControlError as exc:
        print(f"bitnetctl: {exc}", file=sys.stderr)
        return exc.exit_code
    host = args.host or defaults.get("host", DEFAULT_HOST)
    port = args.port if args.port is not None else defaults.get("port", DEFAULT_PORT)
    # An explicit -H/-p means TCP even when the configuration also names a unix socket.
    unix_socket = args.unix_socket or (
        None if (args.host or args.port) else defaults.get("unix_socket")
    )
    args.pidfile = args.pidfile or defaults.get("pidfile", DEFAULT_PIDFILE)
    ep = Endpoint(
        host=host,
        port=port,
        unix_socket=unix_socket,
        api_key=args.api_key or os.environ.get("BITNETD_API_KEY") or defaults.get("api_key"),
        timeout=args.timeout,
        tls=bool(args.tls or args.cacert or args.insecure or defaults.get("tls")),
        cacert=args.cacert,
        insecure=args.insecure,
    )
    try:
        code, data, text = COMMANDS[args.command](ep, args)
    except ControlError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "running": exc.exit_code != EXIT_DOWN}), flush=True)
        print(f"bitnetctl: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True), flush=True)
    elif text:
        print(text, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
