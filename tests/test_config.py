"""Configuration file and environment overrides (bitnetd_trio.config)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest

from bitnetd_trio.config import (
    Config,
    ConfigError,
    describe_config,
    load_config,
    parse_duration,
    parse_listen,
    parse_size,
)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "conf" / "bitnetd.conf.example"


def write(tmp_path: Path, text: str, name: str = "bitnetd.conf") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def problems_of(path, environ=None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ if environ is not None else {})
    return info.value.problems


def test_defaults_without_file():
    c = load_config(None, {})
    assert isinstance(c, Config)
    assert c.source_path is None
    assert c.model.path is None
    assert c.model.threads == (os.cpu_count() or 1)
    assert c.model.ctx_size == 4096
    assert c.model.parallel == 4
    assert c.model.max_tokens_default is None
    assert c.server.listen == ["127.0.0.1:8080"]
    assert c.server.max_queue == 64
    assert c.server.request_timeout == 600.0
    assert c.server.max_body_size == 1 << 20
    assert c.server.drain_timeout == 30.0
    assert c.server.api_keys == []
    assert c.security.rate_limit == 0.0
    assert c.metrics.enabled is True
    assert c.daemon.loglevel == "info"


def test_c_daemon_file(tmp_path):
    model = write(tmp_path, "not really a model", "m.gguf")
    conf = write(
        tmp_path,
        f"""
# the C bitnetd's sections and keys
[daemon]
pidfile = {tmp_path}/bitnetd.pid
logfile = {tmp_path}/bitnetd.log
loglevel = notice

[model]
path = {model.name}
threads = 3
ctx_size = 2048
temperature = 0.2
top_k = 10
top_p = 0.5

[server]
listen = 0.0.0.0:8081, [::1]:9000
unix_socket = {tmp_path}/s.sock
max_connections = 10
request_timeout = 2m
max_body_size = 64k ; inline comment
backlog = 16

[security]
rate_limit = 2.5

[metrics]
enabled = no
""",
    )
    c = load_config(conf, {})
    assert c.source_path == conf
    assert c.daemon.pidfile == str(tmp_path / "bitnetd.pid")
    assert c.daemon.loglevel == "notice"
    assert c.daemon.loglevel_number == 25
    # A relative path is resolved against the file's directory.
    assert c.model.path == str(model)
    assert (c.model.threads, c.model.ctx_size, c.model.top_k) == (3, 2048, 10)
    assert (c.model.temperature, c.model.top_p) == (0.2, 0.5)
    assert c.server.listen == ["0.0.0.0:8081", "[::1]:9000"]
    assert c.server.unix_socket == str(tmp_path / "s.sock")
    assert c.server.request_timeout == 120.0
    assert c.server.max_body_size == 65536
    assert c.server.backlog == 16
    assert c.security.rate_limit == 2.5
    assert c.metrics.enabled is False


def test_all_problems_reported_at_once(tmp_path):
    conf = write(
        tmp_path,
        """
[server]
max_body_size = abc
backlog = 1.5
listen = 127.0.0.1:99999
colour = blue
[model]
threads = 0
top_p = 2
temperature = nan
[nonsense]
a = 1
b = 2
""",
    )
    problems = problems_of(conf)
    assert "[server] max_body_size: 'abc' is not a size (bytes, or a number with k, M or G)" in problems
    assert "[server] backlog: '1.5' is not an integer" in problems
    assert any(p.startswith("[server] listen: '127.0.0.1:99999': port 99999 is out of range") for p in problems)
    assert any(p.startswith("[server] colour: unknown key") for p in problems)
    assert "[model] threads: 0 is out of range (1..1024)" in problems
    assert any(p.startswith("[model] top_p: 2 is out of range") for p in problems)
    assert "[model] temperature: 'nan' is not a finite number" in problems
    # An unknown section is reported once, not once per key.
    assert sum(p.startswith("[nonsense]") for p in problems) == 1
    assert len(problems) == 8
    with pytest.raises(ConfigError) as info:
        load_config(conf, {})
    assert str(conf) in str(info.value)
    assert "8 configuration errors" in str(info.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("threads = 4\n", "before the first [section]"),
        ("[server]\nbacklog = 1\nbacklog = 2\n", "backlog appears twice"),
        ("[server]\n[server]\n", "[server] appears twice"),
        ("[DEFAULT]\nthreads = 4\n", "[DEFAULT]: unknown section"),
        ("[Server]\nbacklog = 4\n", "[Server]: unknown section"),
        ("[server]\nthis line has no equals sign\n", "cannot parse"),
    ],
)
def test_syntax_problems(tmp_path, text, fragment):
    problems = problems_of(write(tmp_path, text))
    assert any(fragment in p for p in problems), problems


def test_missing_file(tmp_path):
    problems = problems_of(tmp_path / "nope.conf")
    assert problems and "cannot read" in problems[0]


def test_not_utf8_file(tmp_path):
    p = tmp_path / "bad.conf"
    p.write_bytes(b"[model]\nalias = \xff\xfe\n")
    assert "not UTF-8" in problems_of(p)[0]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("1048576", 1 << 20),
        ("512k", 512 << 10),
        ("512K", 512 << 10),
        ("4M", 4 << 20),
        ("4MiB", 4 << 20),
        ("4 MB", 4 << 20),
        ("1G", 1 << 30),
        ("100B", 100),
    ],
)
def test_parse_size(raw, expected):
    assert parse_size(raw) == expected


@pytest.mark.parametrize("raw", ["", "abc", "-1", "1.5M", "4T", "M", "4 M B"])
def test_parse_size_rejects(raw):
    with pytest.raises(ValueError):
        parse_size(raw)


@pytest.mark.parametrize(
    "raw, expected",
    [("30", 30.0), ("2.5", 2.5), ("500ms", 0.5), ("30s", 30.0), ("10m", 600.0), ("1h", 3600.0)],
)
def test_parse_duration(raw, expected):
    assert parse_duration(raw) == expected


@pytest.mark.parametrize("raw", ["", "-1", "abc", "1d", "1.s", "nan", "inf"])
def test_parse_duration_rejects(raw):
    with pytest.raises(ValueError):
        parse_duration(raw)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("127.0.0.1:8080", ["127.0.0.1:8080"]),
        ("[::1]:8080", ["[::1]:8080"]),
        ("[0:0:0:0:0:0:0:1]:80", ["[::1]:80"]),
        ("[::]:8080, 0.0.0.0:8080", ["[::]:8080", "0.0.0.0:8080"]),
        ("*:80", ["0.0.0.0:80"]),
        ("localhost:0", ["localhost:0"]),
        ("a:1,,b:2", ["a:1", "b:2"]),
        ("", []),
    ],
)
def test_parse_listen(raw, expected):
    assert parse_listen(raw) == expected


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ("127.0.0.1", "is not 'host:port'"),
        ("8080", "is not 'host:port'"),
        (":8080", "is not 'host:port'"),
        ("127.0.0.1:http", "is not a number"),
        ("127.0.0.1:-1", "is not a number"),
        ("127.0.0.1:65536", "out of range"),
        ("127.0.0.1:\u00b2", "is not a number"),
        ("300.1.1.1:80", "is not an IPv4 address"),
        ("::1:8080", "brackets"),
        ("[::1]8080", "is not '[ipv6]:port'"),
        ("[::g]:80", "is not an IPv6 address"),
        ("bad_host:80", "is not a host name"),
        ("unix:/tmp/s", "unix_socket"),
        ("a:1, a:1", "listed twice"),
    ],
)
def test_parse_listen_rejects(raw, fragment):
    with pytest.raises(ValueError) as info:
        parse_listen(raw)
    assert fragment in str(info.value)


def test_empty_values(tmp_path):
    conf = write(tmp_path, "[server]\nlisten =\nbacklog =\napi_keys =\n[model]\nthreads =\n")
    c = load_config(conf, {})
    assert c.server.listen == []  # empty listen: no TCP listener
    assert c.server.backlog == 128  # other empty values: the default
    assert c.model.threads == (os.cpu_count() or 1)


def test_env_overrides(tmp_path):
    conf = write(tmp_path, "[model]\nthreads = 2\nparallel = 2\n[server]\nmax_body_size = 2k\n")
    env = {
        "MAX_THREADS": "5",
        "MODEL_INSTANCES": "3",
        "BITNETD_SERVER_MAX_BODY_SIZE": "8M",
        "BITNETD_SERVER_LISTEN": "[::]:9999",
        "BITNETD_METRICS_ENABLED": "off",
        "BITNETD_SOMETHING_ELSE": "ignored: not a section of ours",
    }
    c = load_config(conf, env)
    assert c.model.threads == 5
    assert c.model.parallel == 3
    assert c.server.max_body_size == 8 << 20
    assert c.server.listen == ["[::]:9999"]
    assert c.metrics.enabled is False


def test_specific_env_beats_legacy_env():
    c = load_config(None, {"MAX_THREADS": "5", "BITNETD_MODEL_THREADS": "7", "MODEL_INSTANCES": ""})
    assert c.model.threads == 7
    assert c.model.parallel == 4  # empty legacy variable: unset


def test_env_errors_name_the_variable():
    problems = problems_of(
        None,
        {"MAX_THREADS": "many", "BITNETD_SERVER_BACKLOG": "-3", "BITNETD_SERVER_COLOUR": "x"},
    )
    assert "[model] threads (from MAX_THREADS): 'many' is not an integer" in problems
    assert "[server] backlog (from BITNETD_SERVER_BACKLOG): -3 is out of range (1..65535)" in problems
    assert any(p.startswith("BITNETD_SERVER_COLOUR: [server] has no key 'colour'") for p in problems)


def test_bitnetd_config_names_the_file(tmp_path):
    conf = write(tmp_path, "[model]\nparallel = 7\n")
    c = load_config(None, {"BITNETD_CONFIG": str(conf)})
    assert c.model.parallel == 7
    assert c.source_path == conf
    # An explicit path wins over the variable.
    other = write(tmp_path, "[model]\nparallel = 2\n", "other.conf")
    assert load_config(other, {"BITNETD_CONFIG": str(conf)}).model.parallel == 2


def test_paths_checked(tmp_path):
    conf = write(
        tmp_path,
        f"""
[model]
path = missing.gguf
[daemon]
pidfile = {tmp_path}/no/such/dir/bitnetd.pid
logfile = {tmp_path}
""",
    )
    problems = problems_of(conf)
    assert f"[model] path: '{tmp_path}/missing.gguf' does not exist" in problems
    assert f"[daemon] pidfile: directory '{tmp_path}/no/such/dir' does not exist" in problems
    assert f"[daemon] logfile: '{tmp_path}' is a directory" in problems


def test_users_and_groups(tmp_path):
    conf = write(tmp_path, "[daemon]\nuser = root\ngroup = 0\n[server]\nunix_socket_owner = root:root\n")
    c = load_config(conf, {})
    assert (c.daemon.user, c.daemon.group, c.server.unix_socket_owner) == ("root", "0", "root:root")
    bad = write(
        tmp_path,
        "[daemon]\nuser = no-such-user-xyz\n[server]\nunix_socket_owner = root:no-such-group-xyz\n",
        "bad.conf",
    )
    problems = problems_of(bad)
    assert "[daemon] user: no such user 'no-such-user-xyz'" in problems
    assert "[server] unix_socket_owner: no such group 'no-such-group-xyz'" in problems
    only_group = write(tmp_path, "[daemon]\ngroup = root\n", "g.conf")
    assert problems_of(only_group) == ["[daemon] group: set only together with [daemon] user"]


@pytest.mark.parametrize(
    "raw, expected", [("0660", 0o660), ("660", 0o660), ("0o600", 0o600), ("0777", 0o777)]
)
def test_unix_socket_mode(tmp_path, raw, expected):
    c = load_config(write(tmp_path, f"[server]\nunix_socket_mode = {raw}\n"), {})
    assert c.server.unix_socket_mode == expected


@pytest.mark.parametrize("raw", ["0800", "rw-rw----", "01777", "-1"])
def test_unix_socket_mode_rejects(tmp_path, raw):
    problems = problems_of(write(tmp_path, f"[server]\nunix_socket_mode = {raw}\n"))
    assert problems[0].startswith("[server] unix_socket_mode:")


def test_loglevels(tmp_path):
    for name in ["debug", "info", "notice", "warning", "error", "critical", "WARN", "Err", "crit"]:
        load_config(write(tmp_path, f"[daemon]\nloglevel = {name}\n"), {})
    # The daemon's logging setup and the configuration agree on every level (one table).
    c = load_config(write(tmp_path, "[daemon]\nloglevel = crit\n"), {})
    assert c.daemon.loglevel == "critical" and c.daemon.loglevel_number == logging.CRITICAL
    problems = problems_of(write(tmp_path, "[daemon]\nloglevel = verbose\n"))
    assert problems == [
        "[daemon] loglevel: 'verbose' is not a log level "
        "(debug, info, notice, warning, error, critical)"
    ]


def test_api_keys_and_key_file(tmp_path):
    keyfile = write(tmp_path, "# operators' keys\nsk-file-1\n\n  sk-file-2  \n", "keys")
    conf = write(tmp_path, "[server]\napi_keys = sk-a, sk-b\napi_key_file = keys\n")
    c = load_config(conf, {})
    assert c.server.api_keys == ["sk-a", "sk-b", "sk-file-1", "sk-file-2"]
    assert c.server.api_key_file == str(keyfile)


def test_api_key_problems_do_not_leak_the_key(tmp_path):
    write(tmp_path, "sk-\x01secret\n", "keys")
    conf = write(tmp_path, "[server]\napi_key_file = keys\n")
    problems = problems_of(conf)
    assert len(problems) == 1 and "line 1" in problems[0]
    assert "secret" not in problems[0]
    empty = write(tmp_path, "# none\n", "empty")
    assert "holds no key" in problems_of(write(tmp_path, f"[server]\napi_key_file = {empty}\n"))[0]


def test_chat_template_inline_or_file(tmp_path):
    inline = "{% for m in messages %}{{ m.content }}{% endfor %}"
    c = load_config(write(tmp_path, f"[model]\nchat_template = {inline}\n"), {})
    assert c.model.chat_template == inline
    write(tmp_path, "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}\n", "t.jinja")
    c = load_config(write(tmp_path, "[model]\nchat_template = t.jinja\n"), {})
    assert c.model.chat_template.startswith("{{ bos_token }}")
    problems = problems_of(write(tmp_path, "[model]\nchat_template = missing.jinja\n"))
    assert problems[0].startswith("[model] chat_template: ") and "does not exist" in problems[0]
    problems = problems_of(write(tmp_path, "[model]\nchat_template = {% for m in messages %}\n"))
    assert problems[0].startswith("[model] chat_template: Jinja syntax error on line 1")
    write(tmp_path, "{{ messages[0].content }\n", "broken.jinja")
    problems = problems_of(write(tmp_path, "[model]\nchat_template = broken.jinja\n"))
    assert problems[0].startswith(f"[model] chat_template: '{tmp_path}/broken.jinja': Jinja syntax")


def _example_keys() -> dict[tuple[str, str], str]:
    """(section, key) -> value of every commented-out '#key = value' line of the example."""
    keys: dict[tuple[str, str], str] = {}
    section = None
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        m = re.fullmatch(r"\[(\w+)\]", line.strip())
        if m:
            section = m.group(1)
            continue
        m = re.fullmatch(r"#(\w+) =(.*)", line)
        if m and section:
            keys[(section, m.group(1))] = m.group(2).strip()
    return keys


def test_example_documents_every_key_with_its_default(tmp_path):
    from bitnetd_trio import config as cfg
    documented = _example_keys()
    schema = {(s, k) for s, keys in cfg._SCHEMA.items() for k in keys}
    assert set(documented) == schema
    # Uncomment every key whose example value is a default (the paths are examples, not defaults).
    examples_only = {("daemon", "pidfile"), ("model", "path")}
    lines = []
    for section in cfg._SCHEMA:
        lines.append(f"[{section}]")
        for key in cfg._SCHEMA[section]:
            if (section, key) not in examples_only:
                lines.append(f"{key} = {documented[(section, key)]}")
    c = load_config(write(tmp_path, "\n".join(lines) + "\n"), {})
    defaults = load_config(None, {})
    assert c.daemon == defaults.daemon
    assert c.model == defaults.model
    assert c.server == defaults.server
    assert c.security == defaults.security
    assert c.metrics == defaults.metrics


def test_example_file_loads_as_is():
    c = load_config(EXAMPLE, {})
    assert c.server.listen == ["127.0.0.1:8080"]


def test_describe_config_round_trips(tmp_path):
    conf = write(
        tmp_path,
        "[server]\nlisten = [::1]:1, 127.0.0.1:2\nunix_socket_mode = 0600\nmax_body_size = 3M\n"
        "request_timeout = 1.5\ndrain_timeout = 0.25\napi_keys = sk-secret-1\n[metrics]\n"
        "enabled = off\n[model]\nmax_tokens = 12\ntop_p = 0.123456789\nmin_p = 0.00001\n",
    )
    c = load_config(conf, {})
    text = describe_config(c)
    assert "sk-secret-1" not in text and "api_keys = <1 keys>" in text
    assert "listen = [::1]:1, 127.0.0.1:2" in text and "unix_socket_mode = 0600" in text
    # Apart from the masked keys, the description loads back to the same configuration.
    text = text.replace("api_keys = <1 keys>", "api_keys = sk-secret-1")
    again = load_config(write(tmp_path, text, "again.conf"), {})
    assert (again.daemon, again.model, again.server, again.security, again.metrics) == (
        c.daemon, c.model, c.server, c.security, c.metrics)
