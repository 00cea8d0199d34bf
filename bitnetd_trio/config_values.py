"""Values of the configuration file: one parser per kind of value, and the log level names.

Each parser takes the raw string (already stripped, non-empty) and a base directory for relative
paths, and returns the value or raises ValueError with a message that follows "section.key: ".
`bitnetd_trio.config` maps every key to one of them; the public helpers (`parse_size`,
`parse_duration`, `parse_listen`, `split_listen_address`, `log_level_name`) are re-exported there.
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import math
import os
import pwd
import re
import ssl
from collections.abc import Callable
from pathlib import Path

# Syslog-style level names of the C daemon -> Python logging levels. NOTICE sits between INFO and
# WARNING as in syslog; the daemon registers the name with logging.addLevelName.
NOTICE = 25
LOG_LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": NOTICE,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
_LOG_LEVEL_ALIASES = {"warn": "warning", "err": "error", "crit": "critical"}


def log_level_name(raw: str) -> str:
    """The canonical name of a log level (syslog short names accepted); ValueError otherwise."""
    name = raw.strip().lower()
    name = _LOG_LEVEL_ALIASES.get(name, name)
    if name not in LOG_LEVELS:
        raise ValueError(f"{raw!r} is not a log level ({', '.join(LOG_LEVELS)})")
    return name


# ---- value parsers -------------------------------------------------------------------------

_INT_RE = re.compile(r"[+-]?[0-9]+")


def int_in(lo: int, hi: int) -> Callable[[str, Path], int]:
    def parse(raw: str, _base: Path) -> int:
        if not _INT_RE.fullmatch(raw):
            raise ValueError(f"{raw!r} is not an integer")
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range ({lo}..{hi})")
        return value

    return parse


def float_in(lo: float, hi: float) -> Callable[[str, Path], float]:
    def parse(raw: str, _base: Path) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise ValueError(f"{raw!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{raw!r} is not a finite number")
        if not lo <= value <= hi:
            raise ValueError(f"{raw} is out of range ({lo:g}..{hi:g})")
        return value

    return parse


_BOOLEANS = {"1": True, "yes": True, "true": True, "on": True,
             "0": False, "no": False, "false": False, "off": False}


def boolean(raw: str, _base: Path) -> bool:
    try:
        return _BOOLEANS[raw.lower()]
    except KeyError:
        raise ValueError(f"{raw!r} is not a boolean (use true/false, yes/no, on/off, 1/0)") from None


_SIZE_RE = re.compile(r"([0-9]+)\s*(?:([kKmMgG])(?:i?[bB])?|[bB])?")
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(raw: str) -> int:
    """Bytes from '1048576', '512k', '4M', '1GiB' (binary multiples, as nginx does)."""
    m = _SIZE_RE.fullmatch(raw.strip())
    if not m:
        raise ValueError(f"{raw!r} is not a size (bytes, or a number with k, M or G)")
    return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]


def size_in(lo: int, hi: int) -> Callable[[str, Path], int]:
    def parse(raw: str, _base: Path) -> int:
        value = parse_size(raw)
        if not lo <= value <= hi:
            raise ValueError(f"{raw} is out of range ({lo}..{hi} bytes)")
        return value

    return parse


_DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}


def parse_duration(raw: str) -> float:
    """Seconds from '30', '2.5', '500ms', '30s', '10m', '1h'."""
    m = _DURATION_RE.fullmatch(raw.strip())
    if not m:
        raise ValueError(f"{raw!r} is not a duration (seconds, or a number with ms, s, m or h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def duration_in(lo: float, hi: float) -> Callable[[str, Path], float]:
    def parse(raw: str, _base: Path) -> float:
        value = parse_duration(raw)
        if not lo <= value <= hi:
            raise ValueError(f"{raw} is out of range ({lo:g}..{hi:g} seconds)")
        return value

    return parse


def plain_text(raw: str, _base: Path) -> str:
    if any(ord(c) < 32 for c in raw):
        raise ValueError("contains control characters")
    return raw


def _resolve(raw: str, base: Path) -> Path:
    p = Path(os.path.expanduser(raw))
    return p if p.is_absolute() else (base / p)


def existing_file(raw: str, base: Path) -> str:
    p = _resolve(raw, base)
    if not p.exists():
        raise ValueError(f"'{p}' does not exist")
    if not p.is_file():
        raise ValueError(f"'{p}' is not a regular file")
    return str(p)


def creatable_path(raw: str, base: Path) -> str:
    """A file the daemon will create: its directory must exist."""
    p = _resolve(raw, base)
    if p.is_dir():
        raise ValueError(f"'{p}' is a directory")
    if not p.parent.is_dir():
        raise ValueError(f"directory '{p.parent}' does not exist")
    return str(p)


def _digits(text: str) -> bool:
    """ASCII digits only (str.isdigit also accepts '²' and other scripts' digits)."""
    return bool(re.fullmatch(r"[0-9]+", text))


def existing_user(raw: str, _base: Path) -> str:
    try:
        if _digits(raw):
            pwd.getpwuid(int(raw))
        else:
            pwd.getpwnam(raw)
    except KeyError:
        raise ValueError(f"no such user {raw!r}") from None
    return raw


def existing_group(raw: str, _base: Path) -> str:
    try:
        if _digits(raw):
            grp.getgrgid(int(raw))
        else:
            grp.getgrnam(raw)
    except KeyError:
        raise ValueError(f"no such group {raw!r}") from None
    return raw


def owner(raw: str, base: Path) -> str:
    user, _, group = raw.partition(":")
    if not user:
        raise ValueError(f"{raw!r} is not 'user' or 'user:group'")
    existing_user(user, base)
    if group:
        existing_group(group, base)
    return raw


def loglevel(raw: str, _base: Path) -> str:
    return log_level_name(raw)


def octal_mode(raw: str, _base: Path) -> int:
    digits = raw[2:] if raw.lower().startswith("0o") else raw
    if not re.fullmatch(r"[0-7]{1,4}", digits):
        raise ValueError(f"{raw!r} is not an octal file mode such as 0660")
    value = int(digits, 8)
    if value > 0o777:
        raise ValueError(f"{raw!r} is out of range (0000..0777)")
    return value


def _port(text: str, addr: str) -> int:
    if not _digits(text):
        raise ValueError(f"{addr!r}: port {text!r} is not a number")
    port = int(text)
    if port > 65535:
        raise ValueError(f"{addr!r}: port {port} is out of range (0..65535)")
    return port


_HOSTNAME_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62})(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}))*")


def split_listen_address(item: str) -> tuple[str, int]:
    """One 'host:port', '[v6]:port' or '*:port' address -> (host, port), raising ValueError.

    The host comes back without brackets, `*` as 0.0.0.0, IP addresses in canonical form.
    """
    item = item.strip()
    if item.startswith("unix:"):
        raise ValueError(f"{item!r}: use [server] unix_socket for a unix socket")
    if item.startswith("["):
        host, sep, port = item[1:].partition("]:")
        if not sep:
            raise ValueError(f"{item!r} is not '[ipv6]:port'")
        try:
            addr = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{item!r}: {host!r} is not an IPv6 address") from None
        return addr.compressed, _port(port, item)
    if item.count(":") > 1:
        raise ValueError(f"{item!r}: write IPv6 addresses in brackets, e.g. [::1]:8080")
    host, sep, port = item.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{item!r} is not 'host:port'")
    if host == "*":
        host = "0.0.0.0"
    if re.fullmatch(r"[0-9.]+", host):
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{item!r}: {host!r} is not an IPv4 address") from None
    elif not _HOSTNAME_RE.fullmatch(host):
        raise ValueError(f"{item!r}: {host!r} is not a host name or address")
    return host, _port(port, item)


def parse_listen(raw: str) -> list[str]:
    """Comma-separated 'host:port' / '[v6]:port' addresses -> normalized list (raises ValueError)."""
    out: list[str] = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, port = split_listen_address(item)
        out.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    seen: set[str] = set()
    for addr in out:
        if addr in seen:
            raise ValueError(f"{addr!r} is listed twice")
        seen.add(addr)
    return out


def listen(raw: str, _base: Path) -> list[str]:
    return parse_listen(raw)


def _api_key_problem(key: str) -> str | None:
    # Never echo a key in a message: it is a secret that would end in logs.
    if any(c.isspace() or ord(c) < 33 or ord(c) > 126 for c in key):
        return "contains whitespace, control or non-ASCII characters"
    return None


def api_keys(raw: str, _base: Path) -> list[str]:
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    for i, key in enumerate(keys, 1):
        problem = _api_key_problem(key)
        if problem:
            raise ValueError(f"key #{i} {problem}")
    return keys


_ORIGIN_RE = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?")


def cors_origins(raw: str, _base: Path) -> list[str]:
    """Origins allowed to call the API from a browser, comma separated: scheme://host[:port]
    as a browser sends it in `Origin` (no path, no trailing slash), or `*` for any."""
    origins = [o.strip() for o in raw.split(",") if o.strip()]
    for o in origins:
        if o != "*" and not _ORIGIN_RE.fullmatch(o):
            raise ValueError(f"{o!r} is not an origin (scheme://host[:port], or *)")
    return origins


def read_api_key_file(path: str) -> list[str]:
    """One key per line; blank lines and lines starting with '#' are ignored."""
    keys: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            key = line.strip()
            if not key or key.startswith("#"):
                continue
            problem = _api_key_problem(key)
            if problem:
                raise ValueError(f"'{path}' line {lineno}: the key {problem}")
            keys.append(key)
    return keys


def _check_jinja(text: str, where: str) -> str:
    """Syntax errors of a template surface at start-up (and in `bitnetd -t`), not per request."""
    import jinja2
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"{where}Jinja syntax error on line {e.lineno}: {e.message}") from None
    return text


def chat_template(raw: str, base: Path) -> str:
    """Inline Jinja (contains '{{' or '{%') or the path of a file holding the template."""
    if "{{" in raw or "{%" in raw:
        return _check_jinja(raw, "")
    path = existing_file(raw, base)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"'{path}' is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read '{path}': {e.strerror}") from None
    if not text.strip():
        raise ValueError(f"'{path}' is empty")
    return _check_jinja(text, f"'{path}': ")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server's TLS context for [server] tls_cert / tls_key: TLS 1.2 or later, ALPN
    offering HTTP/1.1 only (http-api §0). ssl.SSLError or OSError when the files are unreadable,
    not PEM, or the key does not belong to the certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(certfile=cert, keyfile=key)
    return ctx


def tls_problems(cert: str | None, key: str | None) -> list[str]:
    """What is wrong with a tls_cert / tls_key pair ([] when both are unset or they work)."""
    if not cert and not key:
        return []
    if not cert or not key:
        missing, given = ("tls_key", "tls_cert") if cert else ("tls_cert", "tls_key")
        return [f"[server] {given}: set only together with [server] {missing}"]
    try:
        tls_context(cert, key)
    except (ssl.SSLError, OSError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)
        return [f"[server] tls_cert/tls_key: cannot use '{cert}' with '{key}': {reason}"]
    return []
