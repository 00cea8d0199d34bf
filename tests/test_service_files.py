"""conf/ unit files, the hypercorn config and the man pages: checked with the real tools when
they are installed (systemd-analyze, groff), and read back for the settings the docs promise."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
MAN = REPO / "bitnetd_trio" / "man"


def _unit(name: str) -> configparser.ConfigParser:
    # Unit files allow repeated keys (ListenStream=...): keep the last, we only read single ones.
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment]
    cp.read(CONF / name)
    return cp


def test_service_settings():
    svc = _unit("bitnetd.service")["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert " -f " in svc["ExecStart"] and "bitnetd" in svc["ExecStart"]
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure"
    for key in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "MemoryDenyWriteExecute",
    ):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict"
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert int(svc["LimitNOFILE"]) >= 4096
    # The stop timeout must leave room for the default drain (30 s).
    assert int(svc["TimeoutStopSec"]) > 30


def test_no_trailing_comments_on_setting_lines():
    # systemd takes "Key=value # text" literally: comments must be on their own lines.
    for name in ("bitnetd.service", "bitnetd.socket"):
        for line in (CONF / name).read_text().splitlines():
            if "=" in line and not line.lstrip().startswith(("#", ";")):
                assert " #" not in line and " ;" not in line, line


def test_socket_unit():
    sock = _unit("bitnetd.socket")["Socket"]
    assert sock["Service"] == "bitnetd.service"
    assert "ListenStream" in sock


def test_hypercorn_toml():
    cfg = tomllib.loads((CONF / "hypercorn.toml").read_text())
    assert cfg["worker_class"] == "trio"
    assert cfg["startup_timeout"] >= 60
    # Above the default drain_timeout (30 s), so the app ends streams itself.
    assert cfg["graceful_timeout"] > 30
    from hypercorn.config import Config

    hc = Config.from_toml(CONF / "hypercorn.toml")
    assert hc.worker_class == "trio" and hc.bind == cfg["bind"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    """The units as shipped, with ExecStart pointing at an executable that exists here, and the
    man pages of Documentation= findable through MANPATH."""
    bitnetd = shutil.which("bitnetd")
    if bitnetd is None:
        fake = tmp_path / "bitnetd"
        fake.write_text("#!/bin/sh\n")
        fake.chmod(0o755)
        bitnetd = str(fake)
    units = tmp_path / "units"
    units.mkdir()
    for name in ("bitnetd.service", "bitnetd.socket"):
        text = (CONF / name).read_text().replace("/usr/local/bin/bitnetd", bitnetd)
        (units / name).write_text(text)
    env = dict(os.environ)
    man_ok = shutil.which("man") is not None
    if man_ok:
        mandir = tmp_path / "man"
        for page in MAN.iterdir():
            section = mandir / f"man{page.suffix[1:]}"
            section.mkdir(parents=True, exist_ok=True)
            shutil.copy(page, section / page.name)
        env["MANPATH"] = str(mandir)
    cmd = [
        "systemd-analyze",
        "verify",
        f"--man={'yes' if man_ok else 'no'}",
        str(units / "bitnetd.service"),
        str(units / "bitnetd.socket"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("page", ["bitnetd.8", "bitnetd.conf.5", "bitnetctl.1"])
def test_man_pages_render_without_warnings(page):
    proc = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / page)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LC_ALL": "C.UTF-8"},
        check=False,
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_man_pages_cover_every_config_key_and_command():
    from bitnetd_trio import config as cfgmod
    from bitnetd_trio.tools.control import COMMANDS

    conf5 = (MAN / "bitnetd.conf.5").read_text()
    for section, keys in cfgmod._SCHEMA.items():
        assert f".SH [{section}]" in conf5, section
        for key in keys:
            assert key in conf5, f"[{section}] {key} missing from bitnetd.conf(5)"
    ctl1 = (MAN / "bitnetctl.1").read_text()
    for command in COMMANDS:
        assert f".B {command}" in ctl1
    d8 = (MAN / "bitnetd.8").read_text()
    for sig in ("SIGHUP", "SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"):
        assert sig in d8


def test_man_pages_are_package_data():
    py = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "man/*" in py["tool"]["setuptools"]["package-data"]["bitnetd_trio"]
    assert {p.name for p in MAN.iterdir()} == {"bitnetd.8", "bitnetd.conf.5", "bitnetctl.1"}
