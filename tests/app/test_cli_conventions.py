"""The habits a platform team expects of a CLI and an exporter: `--version`, exit codes in every `--help` and
consistent across commands, shell completion for bash and zsh, `connprobe_build_info`, gzip on `/metrics`."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
from importlib import metadata

import aiohttp
import pytest

from connprobe.agent import Agent
from connprobe.cli import EXIT_CODES, build_parser
from connprobe.web import accepts_gzip, start_server
from tests.agent.helpers import parse_samples, samples_named, write_config

VERSION = metadata.version("connprobe")
COMMANDS = ("lab", "diagnose", "doctor", "check-config", "agent", "demo", "completion")


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "connprobe.cli", *args], capture_output=True, text=True,
                          timeout=60, **kwargs)


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return action.choices


def test_version_comes_from_the_package_metadata():
    p = _cli("--version")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.startswith(f"connprobe {VERSION} (CPython ") and p.stdout.endswith(")\n"), p.stdout


def test_every_command_lists_its_exit_codes_in_help():
    subs = _subparsers()
    assert set(subs) == set(COMMANDS) == set(EXIT_CODES)
    for name, sub in subs.items():
        text = sub.format_help()
        assert "\nexit codes:\n  0  " in text, (name, text)
        assert "\n  2  usage or environment error" in text, (name, text)
    top = build_parser().format_help()
    assert ("exit codes (every command):\n  0  done, healthy\n  1  a problem found, or the config is invalid\n"
            "  2  usage or environment error\n") in top


def test_check_config_exit_codes(tmp_path):
    good = write_config(tmp_path / "good.yml", [{"name": "a", "module": "tcp", "target": "127.0.0.1:9"}])
    bad = tmp_path / "bad.yml"
    bad.write_text("probes: [\n")
    assert _cli("check-config", str(good)).returncode == 0
    p = _cli("check-config", str(bad))
    assert p.returncode == 1 and "invalid YAML" in p.stderr
    p = _cli("check-config", str(tmp_path / "missing.yml"))
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == f"check-config: {tmp_path / 'missing.yml'}: cannot read: No such file or directory\n"
    p = _cli("check-config", "--no-such-option", str(good))
    assert p.returncode == 2 and "unrecognized arguments" in p.stderr


def test_usage_errors_are_2_for_every_command():
    for name in COMMANDS:
        p = _cli(name, "--no-such-option-anywhere")
        assert p.returncode == 2, (name, p)
        assert "unrecognized arguments" in p.stderr or "required" in p.stderr, (name, p.stderr)


def _bash_complete(script: str, *words: str) -> list[str]:
    """What bash's completion function offers for the words typed so far (the last one being completed)."""
    words_arr = " ".join(f"'{w}'" for w in words)
    program = (f"source {script}\nCOMP_WORDS=({words_arr})\nCOMP_CWORD={len(words) - 1}\n"
               "COMP_LINE=\"${COMP_WORDS[*]}\"\nCOMP_POINT=${#COMP_LINE}\n"
               "_shtab_connprobe\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    p = subprocess.run(["bash", "--norc", "--noprofile", "-c", program], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    return [w for w in p.stdout.splitlines() if w]


def test_bash_completion_script_parses_and_completes(tmp_path):
    p = _cli("completion", "bash")
    assert p.returncode == 0 and p.stderr == ""
    script = tmp_path / "connprobe.bash"
    script.write_text(p.stdout)
    check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    assert "complete -o bashdefault -F _shtab_connprobe connprobe" in p.stdout
    assert sorted(_bash_complete(str(script), "connprobe", "")) == sorted(COMMANDS)
    assert _bash_complete(str(script), "connprobe", "ch") == ["check-config"]
    assert _bash_complete(str(script), "connprobe", "completion", "") == ["bash", "zsh"]
    assert _bash_complete(str(script), "connprobe", "agent", "--no-c") == ["--no-config-watch"]
    # compgen over the script's own list of subcommands, as a user's `complete -W` would
    program = f"source {script}; compgen -W \"${{_shtab_connprobe_subparsers[*]}}\" -- d"
    words = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, timeout=30)
    assert words.stdout.split() == ["diagnose", "doctor", "demo"]


def test_zsh_completion_script(tmp_path):
    p = _cli("completion", "zsh")
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout.startswith("#compdef connprobe")
    for name in COMMANDS:
        assert f"\n    {name}:'" in p.stdout, name
    assert "--no-config-watch" in p.stdout and "--web.config.file" in p.stdout
    zsh = shutil.which("zsh")
    if zsh is not None:  # scripts/setup installs it; the syntax check needs the shell itself
        script = tmp_path / "_connprobe"
        script.write_text(p.stdout)
        check = subprocess.run([zsh, "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr


def test_unknown_shell_is_a_usage_error():
    p = _cli("completion", "fish")
    assert p.returncode == 2 and "invalid choice: 'fish'" in p.stderr


@pytest.mark.parametrize(("header", "expected"), [
    ("gzip", True), ("gzip, deflate, br", True), ("deflate, gzip;q=0.5", True), ("x-gzip", True), ("*", True),
    ("", False), ("identity", False), ("gzip;q=0", False), ("br, *;q=0", False), ("gzip;q=0, *", False),
    ("gzip;q=bad", False), ("GZIP", True),
])
def test_accepts_gzip(header, expected):
    assert accepts_gzip(header) is expected


async def test_metrics_are_gzipped_when_asked_and_carry_build_info(tmp_path):
    cfg = write_config(tmp_path / "c.yml", [{"name": f"p{i}", "module": "tcp", "target": "127.0.0.1:9",
                                             "interval": "1h"} for i in range(50)])
    a = Agent(cfg, kernel=False)
    await a.start()
    runner = await start_server(a, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    try:
        await a.wait_ready(10)
        async with aiohttp.ClientSession(auto_decompress=False) as s:
            async with s.get(url, headers={"Accept-Encoding": "gzip"}) as r:
                assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
                assert r.headers["Vary"] == "Accept-Encoding"
                packed = await r.read()
            async with s.get(url, headers={"Accept-Encoding": "identity"}) as r:
                assert "Content-Encoding" not in r.headers
                plain = await r.read()
        text = gzip.decompress(packed).decode()
        assert len(packed) * 5 < len(text), (len(packed), len(text))
        zipped, unzipped = parse_samples(text), parse_samples(plain.decode())
        assert {n for n, _ in zipped} == {n for n, _ in unzipped}
        assert len(text.splitlines()) == len(plain.decode().splitlines())
        info = samples_named(zipped, "connprobe_build_info")
        assert len(info) == 1
        labels = dict(next(iter(info)))
        assert labels["version"] == VERSION and labels["python"] == ".".join(map(str, sys.version_info[:3]))
        assert list(info.values()) == [1.0]
    finally:
        await runner.cleanup()
        await a.stop()
