"""The configuration file (INI, compatible with the C bitnetd) and its environment overrides.

Precedence, lowest first: built-in defaults, the file, the legacy variables of the Docker server
(`MAX_THREADS` -> [model] threads, `MODEL_INSTANCES` -> [model] parallel), then
`BITNETD_<SECTION>_<KEY>` (e.g. `BITNETD_SERVER_MAX_BODY_SIZE=4M`). `BITNETD_CONFIG` names the
file when no path is given (for `hypercorn ... bitnetd_trio.app:app`).

Every problem is collected and raised at once as `ConfigError`, each naming the key and where its
value came from, so `bitnetd -t` can print them all. An empty value means "the default" (except
`listen`, where empty means "no TCP listener", and the key lists, where it means "none").
Relative paths are resolved against the directory of the configuration file (the daemon changes
its directory to / when it detaches).
"""

from __future__ import annotations

import configparser
import grp
import ipaddress
import logging
import math
import os
import pwd
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LOG_LEVELS",
    "Config",
    "ConfigError",
    "DaemonConfig",
    "MetricsConfig",
    "ModelConfig",
    "SecurityConfig",
    "ServerConfig",
    "describe_config",
    "load_config",
    "log_level_name",
    "parse_duration",
    "parse_listen",
    "parse_size",
    "split_listen_address",
]


class ConfigError(Exception):
    """A configuration with one or more problems; `.problems` names each key and what is wrong."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        if len(self.problems) == 1:
            text = f"configuration error{where}: {self.problems[0]}"
        else:
            lines = "\n".join(f"  {p}" for p in self.problems)
            text = f"{len(self.problems)} configuration errors{where}:\n{lines}"
        super().__init__(text)

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


@dataclass(frozen=True)
class DaemonConfig:
    user: str | None = None  # drop privileges to this user after binding (daemon mode)
    group: str | None = None  # and this group (default: the user's primary group)
    pidfile: str | None = None  # absolute path, locked with flock; None: no pidfile
    logfile: str | None = None  # absolute path; None: syslog (daemon) or stderr (-f)
    loglevel: str = "info"  # one of LOG_LEVELS

    @property
    def loglevel_number(self) -> int:
        return LOG_LEVELS[self.loglevel]


@dataclass(frozen=True)
class ModelConfig:
    path: str | None = None  # absolute path of the GGUF file; None: the demo model
    alias: str | None = None  # extra model id accepted in requests and listed in /v1/models
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    ctx_size: int = 4096  # capped to the model's training context; 0: the training context
    parallel: int = 4  # concurrent sequences (engine slots)
    temperature: float = 0.8  # sampling defaults for requests that do not set them
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    chat_template: str | None = None  # Jinja template text (read from the file if a path was given)
    max_tokens_default: int | None = None  # default max tokens; None: until the context is full


@dataclass(frozen=True)
class ServerConfig:
    listen: list[str] = field(default_factory=lambda: ["127.0.0.1:8080"])
    unix_socket: str | None = None
    unix_socket_mode: int = 0o660
    unix_socket_owner: str | None = None  # "user" or "user:group"
    max_connections: int = 256  # simultaneous HTTP requests being served; beyond: 503
    max_open_connections: int = 1024  # open client connections; beyond: wait in the backlog
    header_timeout: float = 10.0  # seconds to send a request head (and to idle between requests)
    body_timeout: float = 30.0  # seconds to send a whole request body; beyond: 408
    request_timeout: float = 600.0  # seconds; 0: no limit
    max_body_size: int = 1 << 20  # bytes; beyond: 413
    backlog: int = 128
    max_queue: int = 64  # sequences (prompts x n) waiting for a free slot; beyond: 503
    drain_timeout: float = 30.0  # seconds running generations may finish after TERM/INT
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    api_key_file: str | None = None  # where some of api_keys came from (re-read on reload)


@dataclass(frozen=True)
class SecurityConfig:
    rate_limit: float = 0.0  # requests per second per client address; 0: off


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True  # serve GET /metrics
    require_api_key: bool = False  # /metrics needs the API key too (when api_keys are set)


@dataclass(frozen=True)
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source_path: Path | None = None  # the file read, if any


# ---- value parsers -------------------------------------------------------------------------
# Each takes the raw string (already stripped, non-empty) and a base directory for relative
# paths, and returns the value or raises ValueError with a message that follows "section.key: ".

_INT_RE = re.compile(r"[+-]?[0-9]+")


def _int_in(lo: int, hi: int) -> Callable[[str, Path], int]:
    def parse(raw: str, _base: Path) -> int:
        if not _INT_RE.fullmatch(raw):
            raise ValueError(f"{raw!r} is not an integer")
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"{value} is out of range ({lo}..{hi})")
        return value

    return parse


def _float_in(lo: float, hi: float) -> Callable[[str, Path], float]:
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


def _boolean(raw: str, _base: Path) -> bool:
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


def _size_in(lo: int, hi: int) -> Callable[[str, Path], int]:
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


def _duration_in(lo: float, hi: float) -> Callable[[str, Path], float]:
    def parse(raw: str, _base: Path) -> float:
        value = parse_duration(raw)
        if not lo <= value <= hi:
            raise ValueError(f"{raw} is out of range ({lo:g}..{hi:g} seconds)")
        return value

    return parse


def _text(raw: str, _base: Path) -> str:
    if any(ord(c) < 32 for c in raw):
        raise ValueError("contains control characters")
    return raw


def _resolve(raw: str, base: Path) -> Path:
    p = Path(os.path.expanduser(raw))
    return p if p.is_absolute() else (base / p)


def _existing_file(raw: str, base: Path) -> str:
    p = _resolve(raw, base)
    if not p.exists():
        raise ValueError(f"'{p}' does not exist")
    if not p.is_file():
        raise ValueError(f"'{p}' is not a regular file")
    return str(p)


def _creatable_path(raw: str, base: Path) -> str:
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


def _user(raw: str, _base: Path) -> str:
    try:
        if _digits(raw):
            pwd.getpwuid(int(raw))
        else:
            pwd.getpwnam(raw)
    except KeyError:
        raise ValueError(f"no such user {raw!r}") from None
    return raw


def _group(raw: str, _base: Path) -> str:
    try:
        if _digits(raw):
            grp.getgrgid(int(raw))
        else:
            grp.getgrnam(raw)
    except KeyError:
        raise ValueError(f"no such group {raw!r}") from None
    return raw


def _owner(raw: str, base: Path) -> str:
    user, _, group = raw.partition(":")
    if not user:
        raise ValueError(f"{raw!r} is not 'user' or 'user:group'")
    _user(user, base)
    if group:
        _group(group, base)
    return raw


def _loglevel(raw: str, _base: Path) -> str:
    return log_level_name(raw)


def _octal_mode(raw: str, _base: Path) -> int:
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


def _listen(raw: str, _base: Path) -> list[str]:
    return parse_listen(raw)


def _api_key_problem(key: str) -> str | None:
    # Never echo a key in a message: it is a secret that would end in logs.
    if any(c.isspace() or ord(c) < 33 or ord(c) > 126 for c in key):
        return "contains whitespace, control or non-ASCII characters"
    return None


def _api_keys(raw: str, _base: Path) -> list[str]:
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    for i, key in enumerate(keys, 1):
        problem = _api_key_problem(key)
        if problem:
            raise ValueError(f"key #{i} {problem}")
    return keys


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


def _chat_template(raw: str, base: Path) -> str:
    """Inline Jinja (contains '{{' or '{%') or the path of a file holding the template."""
    if "{{" in raw or "{%" in raw:
        return _check_jinja(raw, "")
    path = _existing_file(raw, base)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"'{path}' is not UTF-8 text") from None
    except OSError as e:
        raise ValueError(f"cannot read '{path}': {e.strerror}") from None
    if not text.strip():
        raise ValueError(f"'{path}' is empty")
    return _check_jinja(text, f"'{path}': ")


# ---- the schema: (section, key) -> (dataclass attribute, parser) -----------------------------
# Empty values keep the default, except where _EMPTY says otherwise.

_Parser = Callable[[str, Path], Any]

_SCHEMA: dict[str, dict[str, tuple[str, _Parser]]] = {
    "daemon": {
        "user": ("user", _user),
        "group": ("group", _group),
        "pidfile": ("pidfile", _creatable_path),
        "logfile": ("logfile", _creatable_path),
        "loglevel": ("loglevel", _loglevel),
    },
    "model": {
        "path": ("path", _existing_file),
        "alias": ("alias", _text),
        "threads": ("threads", _int_in(1, 1024)),
        "ctx_size": ("ctx_size", _int_in(0, 1 << 24)),
        "parallel": ("parallel", _int_in(1, 256)),
        "temperature": ("temperature", _float_in(0.0, 2.0)),
        "top_k": ("top_k", _int_in(0, 1 << 24)),
        "top_p": ("top_p", _float_in(0.0, 1.0)),
        "min_p": ("min_p", _float_in(0.0, 1.0)),
        "chat_template": ("chat_template", _chat_template),
        "max_tokens": ("max_tokens_default", _int_in(1, 1 << 24)),
    },
    "server": {
        "listen": ("listen", _listen),
        "unix_socket": ("unix_socket", _creatable_path),
        "unix_socket_mode": ("unix_socket_mode", _octal_mode),
        "unix_socket_owner": ("unix_socket_owner", _owner),
        "max_connections": ("max_connections", _int_in(1, 1_000_000)),
        "max_open_connections": ("max_open_connections", _int_in(1, 1_000_000)),
        "header_timeout": ("header_timeout", _duration_in(0.1, 3600.0)),
        "body_timeout": ("body_timeout", _duration_in(0.1, 86400.0)),
        "request_timeout": ("request_timeout", _duration_in(0.0, 7 * 86400.0)),
        "max_body_size": ("max_body_size", _size_in(1024, 1 << 30)),
        "backlog": ("backlog", _int_in(1, 65535)),
        "max_queue": ("max_queue", _int_in(0, 1_000_000)),
        "drain_timeout": ("drain_timeout", _duration_in(0.0, 86400.0)),
        "api_keys": ("api_keys", _api_keys),
        "api_key_file": ("api_key_file", _existing_file),
    },
    "security": {
        "rate_limit": ("rate_limit", _float_in(0.0, 1e6)),
    },
    "metrics": {
        "enabled": ("enabled", _boolean),
        "require_api_key": ("require_api_key", _boolean),
    },
}

# Keys whose empty value is meaningful rather than "the default".
_EMPTY: dict[tuple[str, str], Any] = {
    ("server", "listen"): [],
    ("server", "api_keys"): [],
}

_SECTION_CLASSES = {
    "daemon": DaemonConfig,
    "model": ModelConfig,
    "server": ServerConfig,
    "security": SecurityConfig,
    "metrics": MetricsConfig,
}

# Legacy variables of the Docker "BitNet LLM HTTP Server".
_LEGACY_ENV = {"MAX_THREADS": ("model", "threads"), "MODEL_INSTANCES": ("model", "parallel")}
_ENV_PREFIX = "BITNETD_"
CONFIG_ENV = "BITNETD_CONFIG"


def _read_file(path: Path, problems: list[str]) -> list[tuple[str, str, str, str]]:
    """(section, key, raw value, origin) for every key of the file; syntax errors -> problems."""
    # A default section name that cannot occur in a file: "[DEFAULT]" is then an unknown section
    # instead of silently applying its keys to every section.
    parser = configparser.ConfigParser(
        interpolation=None,
        default_section="\x00",
        inline_comment_prefixes=("#", ";"),
        strict=True,
    )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        problems.append(f"{path}: not UTF-8 text")
        return []
    except OSError as e:
        problems.append(f"cannot read {path}: {e.strerror}")
        return []
    try:
        parser.read_string(text, source=str(path))
    except configparser.MissingSectionHeaderError as e:
        problems.append(f"{path} line {e.lineno}: a key before the first [section] header")
        return []
    except configparser.DuplicateSectionError as e:
        problems.append(f"{path} line {e.lineno}: section [{e.section}] appears twice")
        return []
    except configparser.DuplicateOptionError as e:
        problems.append(f"{path} line {e.lineno}: [{e.section}] {e.option} appears twice")
        return []
    except configparser.ParsingError as e:
        for lineno, line in e.errors:
            problems.append(f"{path} line {lineno}: cannot parse {line.strip()!r}")
        return []
    items = []
    for section in parser.sections():
        for key, value in parser.items(section, raw=True):
            items.append((section, key, value, str(path)))
    return items


def _env_items(environ: Mapping[str, str], problems: list[str]) -> list[tuple[str, str, str, str]]:
    items: list[tuple[str, str, str, str]] = []
    for name, (section, key) in _LEGACY_ENV.items():
        value = environ.get(name, "")
        # An empty legacy variable is treated as unset (docker-compose files often have them).
        if value.strip() and f"{_ENV_PREFIX}{section}_{key}".upper() not in environ:
            items.append((section, key, value, name))
    for name in sorted(environ):
        if not name.startswith(_ENV_PREFIX) or name == CONFIG_ENV:
            continue
        rest = name[len(_ENV_PREFIX):].lower()
        section = next((s for s in _SCHEMA if rest.startswith(s + "_")), None)
        if section is None:
            continue  # not ours (BITNETD_* variables of scripts, tests, ...)
        key = rest[len(section) + 1:]
        if key not in _SCHEMA[section]:
            known = ", ".join(_SCHEMA[section])
            problems.append(f"{name}: [{section}] has no key {key!r} (keys: {known})")
            continue
        items.append((section, key, environ[name], name))
    return items


def load_config(path: str | Path | None = None, environ: Mapping[str, str] = os.environ) -> Config:
    """Read the file (or $BITNETD_CONFIG, or nothing) and the environment into a `Config`."""
    problems: list[str] = []
    source: Path | None = None
    if path is None and environ.get(CONFIG_ENV, "").strip():
        path = environ[CONFIG_ENV].strip()
    items: list[tuple[str, str, str, str]] = []
    if path is not None:
        source = Path(path).expanduser().absolute()
        items += _read_file(source, problems)
    items += _env_items(environ, problems)

    file_base = source.parent if source is not None else Path.cwd()
    values: dict[str, dict[str, Any]] = {s: {} for s in _SCHEMA}
    bad_sections: set[str] = set()
    for section, key, raw, origin in items:
        from_env = origin != str(source)
        where = f" (from {origin})" if from_env else ""
        if section not in _SCHEMA:
            if section not in bad_sections:
                bad_sections.add(section)
                problems.append(
                    f"[{section}]: unknown section (sections: {', '.join(_SCHEMA)})"
                )
            continue
        if key not in _SCHEMA[section]:
            problems.append(
                f"[{section}] {key}: unknown key (keys of [{section}]: "
                f"{', '.join(_SCHEMA[section])})"
            )
            continue
        attr, parse = _SCHEMA[section][key]
        raw = raw.strip()
        if not raw:
            if (section, key) in _EMPTY:
                values[section][attr] = _EMPTY[(section, key)]
            else:
                values[section].pop(attr, None)  # an override back to the default
            continue
        base = Path.cwd() if from_env else file_base
        try:
            values[section][attr] = parse(raw, base)
        except ValueError as e:
            problems.append(f"[{section}] {key}{where}: {e}")

    # Keys read from a file named by another key.
    key_file = values["server"].get("api_key_file")
    if key_file:
        try:
            extra = read_api_key_file(key_file)
        except ValueError as e:
            problems.append(f"[server] api_key_file: {e}")
        except OSError as e:
            problems.append(f"[server] api_key_file: cannot read '{key_file}': {e.strerror}")
        else:
            if not extra:
                problems.append(f"[server] api_key_file: '{key_file}' holds no key")
            values["server"]["api_keys"] = list(values["server"].get("api_keys", [])) + extra

    if values["daemon"].get("group") and not values["daemon"].get("user"):
        problems.append("[daemon] group: set only together with [daemon] user")

    if problems:
        raise ConfigError(problems, str(source) if source else None)
    sections = {name: cls(**values[name]) for name, cls in _SECTION_CLASSES.items()}
    return Config(**sections, source_path=source)


def _format_value(section: str, key: str, value: Any) -> str:
    if value is None:
        return ""
    if (section, key) == ("server", "api_keys"):
        return f"<{len(value)} keys>" if value else ""  # secrets stay out of logs
    if (section, key) == ("model", "chat_template"):
        return f"<template, {len(value)} characters>"
    if (section, key) == ("server", "unix_socket_mode"):
        return f"{value:04o}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, float):
        if key.endswith("_timeout"):  # durations take no exponent
            return format(value, "f").rstrip("0").rstrip(".") or "0"
        return repr(value)  # exact, so the description loads back to the same value
    return str(value)


def describe_config(config: Config) -> str:
    """The effective configuration in the file's syntax (API keys and templates masked)."""
    lines = []
    if config.source_path is not None:
        lines.append(f"# from {config.source_path} and the environment")
    for section, keys in _SCHEMA.items():
        lines.append(f"[{section}]")
        obj = getattr(config, section)
        for key, (attr, _parse) in keys.items():
            lines.append(f"{key} = {_format_value(section, key, getattr(obj, attr))}".rstrip())
        lines.append("")
    return "\n".join(lines)
