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
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitnetd_trio import config_values as v
from bitnetd_trio.config_values import (
    LOG_LEVELS,
    NOTICE,
    log_level_name,
    parse_duration,
    parse_listen,
    parse_size,
    read_api_key_file,
    split_listen_address,
    tls_problems,
)

__all__ = [
    "LOG_LEVELS",
    "NOTICE",
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
    alias: str | None = None  # extra model id accepted in requests (shown in the card's aliases)
    expose_path: bool = False  # /props, /model_info, model cards: the file's path, not its name
    # a request naming an unknown model gets 404 instead of being served by the one model
    strict_model_name: bool = False
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
    drain_delay: float = 0.0  # seconds /health says 503 before the listener closes on TERM
    drain_timeout: float = 30.0  # seconds running generations may finish after TERM/INT
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    api_key_file: str | None = None  # where some of api_keys came from (re-read on reload)
    cors_origins: list[str] = field(default_factory=list)  # browser origins allowed; "*": any
    tls_cert: str | None = None  # PEM certificate (chain) for every TCP listener: https
    tls_key: str | None = None  # its PEM private key
    web_ui: bool | None = None  # the chat page at /; None: on when a listener is loopback
    # constrained decoding (response_format, tools, grammar): what one request's grammar may cost
    max_grammar_size: int = 64 << 10  # bytes of one schema or grammar; beyond: 400
    max_grammar_depth: int = 32  # nesting of a JSON schema; beyond: 400
    grammar_step_limit: int = 50_000  # parser items per token mask (~2.5 ms); beyond: the
    # sequence ends with an error naming the limit


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


# ---- the schema: (section, key) -> (dataclass attribute, parser) -----------------------------
# Empty values keep the default, except where _EMPTY says otherwise.

_Parser = Callable[[str, Path], Any]

_SCHEMA: dict[str, dict[str, tuple[str, _Parser]]] = {
    "daemon": {
        "user": ("user", v.existing_user),
        "group": ("group", v.existing_group),
        "pidfile": ("pidfile", v.creatable_path),
        "logfile": ("logfile", v.creatable_path),
        "loglevel": ("loglevel", v.loglevel),
    },
    "model": {
        "path": ("path", v.existing_file),
        "alias": ("alias", v.plain_text),
        "expose_path": ("expose_path", v.boolean),
        "strict_model_name": ("strict_model_name", v.boolean),
        "threads": ("threads", v.int_in(1, 1024)),
        "ctx_size": ("ctx_size", v.int_in(0, 1 << 24)),
        "parallel": ("parallel", v.int_in(1, 256)),
        "temperature": ("temperature", v.float_in(0.0, 2.0)),
        "top_k": ("top_k", v.int_in(0, 1 << 24)),
        "top_p": ("top_p", v.float_in(0.0, 1.0)),
        "min_p": ("min_p", v.float_in(0.0, 1.0)),
        "chat_template": ("chat_template", v.chat_template),
        "max_tokens": ("max_tokens_default", v.int_in(1, 1 << 24)),
    },
    "server": {
        "listen": ("listen", v.listen),
        "unix_socket": ("unix_socket", v.creatable_path),
        "unix_socket_mode": ("unix_socket_mode", v.octal_mode),
        "unix_socket_owner": ("unix_socket_owner", v.owner),
        "max_connections": ("max_connections", v.int_in(1, 1_000_000)),
        "max_open_connections": ("max_open_connections", v.int_in(1, 1_000_000)),
        "header_timeout": ("header_timeout", v.duration_in(0.1, 3600.0)),
        "body_timeout": ("body_timeout", v.duration_in(0.1, 86400.0)),
        "request_timeout": ("request_timeout", v.duration_in(0.0, 7 * 86400.0)),
        "max_body_size": ("max_body_size", v.size_in(1024, 1 << 30)),
        "backlog": ("backlog", v.int_in(1, 65535)),
        "max_queue": ("max_queue", v.int_in(0, 1_000_000)),
        "drain_delay": ("drain_delay", v.duration_in(0.0, 3600.0)),
        "drain_timeout": ("drain_timeout", v.duration_in(0.0, 86400.0)),
        "api_keys": ("api_keys", v.api_keys),
        "api_key_file": ("api_key_file", v.existing_file),
        "cors_origins": ("cors_origins", v.cors_origins),
        "tls_cert": ("tls_cert", v.existing_file),
        "tls_key": ("tls_key", v.existing_file),
        "web_ui": ("web_ui", v.boolean),
        "max_grammar_size": ("max_grammar_size", v.size_in(256, 16 << 20)),
        "max_grammar_depth": ("max_grammar_depth", v.int_in(1, 1024)),
        "grammar_step_limit": ("grammar_step_limit", v.int_in(1000, 10_000_000)),
    },
    "security": {
        "rate_limit": ("rate_limit", v.float_in(0.0, 1e6)),
    },
    "metrics": {
        "enabled": ("enabled", v.boolean),
        "require_api_key": ("require_api_key", v.boolean),
    },
}

# Keys whose empty value is meaningful rather than "the default".
_EMPTY: dict[tuple[str, str], Any] = {
    ("server", "listen"): [],
    ("server", "api_keys"): [],
    ("server", "cors_origins"): [],
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

    problems += tls_problems(values["server"].get("tls_cert"), values["server"].get("tls_key"))
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
