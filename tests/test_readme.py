"""The README stays true to the code: its config reference loads, its commands exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from gateway.auth import hash_key
from gateway.config import loads

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def block_after(heading: str, language: str) -> str:
    section = README[README.index(heading) :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block after {heading}"
    return match.group(1)


def test_config_reference_is_a_valid_config() -> None:
    text = block_after("## Configuration", "toml").replace('"sha256:..."', f'"{hash_key("x")}"')
    config = loads(text)
    assert config.server.port == 8080
    assert config.tiers["free"].upgrade_to == "pro"
    assert config.aliases["balanced"].weights == (3.0, 1.0)
    assert config.keys[0].limits.tokens_per_day == 50000


def test_install_and_test_commands_are_the_ones_ci_runs() -> None:
    assert "pip install -e . && gateway --config config.example.toml" in README
    assert "pip install -e '.[test]' && pytest" in README
    assert "pip install -e '.[test]' && pytest" in (ROOT / ".ci/run").read_text()


def test_every_command_line_in_the_readme_exists() -> None:
    for line in block_after("## Command line", "text").splitlines():
        words = line.split()
        command = [w for w in words[1:3] if not w.startswith(("-", "["))]
        if not command:
            continue
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *command, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )
        assert result.returncode == 0, (line, result.stderr)
        for option in re.findall(r"--[a-z-]+", line):
            assert option in result.stdout, (line, option)
