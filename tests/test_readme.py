"""The README's commands exist with the flags it uses (a user copies them as they are)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _block_after(heading: str) -> str:
    """The first ```sh block after a heading."""
    rest = README[README.index(heading) :]
    return re.search(r"```sh\n(.*?)```", rest, re.S).group(1)


def test_model_download_step_uses_a_command_that_exists():
    block = _block_after("## The real model")
    download = next(line for line in block.splitlines() if " download " in line)
    program, subcommand = download.split()[:2]
    # huggingface_hub (a dependency of the test extras, and what the step installs) provides it.
    assert shutil.which(program), f"{program!r} from the README's download step is not installed"
    help_text = subprocess.run(
        [program, subcommand, "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert help_text.returncode == 0, help_text.stderr
    for flag in re.findall(r"--[a-z-]+", download):
        assert flag in help_text.stdout, flag


def test_listen_option_the_readme_documents():
    assert "bitnetd -f --listen 127.0.0.1:9000" in README
    out = subprocess.run(
        [sys.executable, "-m", "bitnetd_trio.daemon.cli", "--help"],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    ).stdout
    assert "--listen" in out


def test_model_family_downloads_parse():
    """Every `hf download` line of "Model families" uses flags `hf download` has, and names a
    repository as owner/name."""
    block = _block_after("## Model families")
    lines = [line for line in block.splitlines() if line.startswith("hf download ")]
    assert len(lines) >= 8
    assert shutil.which("hf"), "hf (huggingface_hub) is not installed"
    help_text = subprocess.run(
        ["hf", "download", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert help_text.returncode == 0, help_text.stderr
    for line in lines:
        repo = line.split()[2]
        assert re.fullmatch(r"[\w.-]+/[\w.-]+", repo), line
        for flag in re.findall(r"--[a-z-]+", line):
            assert flag in help_text.stdout, (line, flag)
    section = README[README.index("## Model families"):README.index("## How it works")]
    for family in ("BitNet-b1.58-2B-4T", "Falcon3-{1,3,7,10}B-Instruct-1.58bit",
                   "Falcon-E-{1B,3B}-Instruct", "Llama3-8B-1.58-100B-tokens",
                   "BitNet-embedding-0.6B", "Ternary Bonsai 1.7B / 4B / 8B"):
        assert family in section, family
