"""The `connprobe` command line: builds the parser and dispatches. Each command is a module of
`connprobe/commands/` (`add_arguments`, `run`); this file only names them, their help and their exit codes.

Exit codes are the same across commands: 0 done (healthy), 1 the thing checked is bad (a probe found a
problem, the config is invalid, a kernel check failed), 2 a usage or environment error (a bad option, a file
that cannot be read, a namespace that does not exist, an address that cannot be listened on). Each
command's `--help` lists its own (`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys

# The commands in the order `connprobe --help` lists them: name, module (connprobe/commands/), help line. A
# command's module (and all it imports) is loaded only when that command runs or --help lists every option.
COMMANDS = (
    ("lab", "lab", "bring the built-in network lab up or down, or show it"),
    ("diagnose", "diagnose", "probe a target with the kernel sensor attached and say why it fails"),
    ("doctor", "doctor", "check root, BPF, BTF, tracefs, headers and each tracepoint"),
    ("check-config", "check_config", "validate a config file without running it"),
    ("agent", "agent", "run the probes continuously; serve /metrics, /probe and a status page"),
    ("demo", "demo", "run the agent on the lab with faults switching on and off; show verdicts"),
    ("completion", "completion", "print a shell completion script (bash or zsh)"),
)
COMMAND_NAMES = frozenset(name for name, _, _ in COMMANDS)

USAGE = "2  usage or environment error (a bad option or value"
EXIT_CODES: dict[str, tuple[str, ...]] = {
    "lab": ("0  done", "1  a lab could not be removed completely (what is left is listed)",
            f"{USAGE}, no such lab, the lab could not be built)"),
    "diagnose": ("0  every attempt was healthy", "1  an attempt found a problem (the verdict names it)",
                 f"{USAGE}, a source namespace that does not exist)"),
    "doctor": ("0  the kernel sensor can run (warnings are listed)", "1  a check failed: no kernel evidence",
               f"{USAGE})"),
    "check-config": ("0  the config is valid (a summary is printed)", "1  the config is invalid (one line per error)",
                     f"{USAGE}, the file is missing or cannot be read)"),
    "agent": ("0  stopped by SIGTERM or SIGINT",
              f"{USAGE}, an invalid config or --web.config.file at start-up, the address cannot be listened on)"),
    "demo": ("0  done", f"{USAGE}, the lab could not be built)", "130  interrupted (Ctrl-C)"),
    "completion": ("0  the script was printed", f"{USAGE}: an unknown shell)"),
}


def _epilog(command: str) -> str:
    return "exit codes:\n" + "\n".join(f"  {line}" for line in EXIT_CODES[command])


class _WithExitCodes:
    """Subparsers whose `add_parser` ends the command's --help with its exit codes (`EXIT_CODES`)."""

    def __init__(self, subparsers: argparse._SubParsersAction):
        self.subparsers = subparsers

    def add_parser(self, name: str, **kwargs: object) -> argparse.ArgumentParser:
        return self.subparsers.add_parser(name, epilog=_epilog(name),  # type: ignore[arg-type]
                                          formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


class _Version(argparse.Action):
    """--version, its text read only when asked (reading the package metadata costs every other run ~20 ms)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        from connprobe.version import version_text

        sys.stdout.write(version_text() + "\n")
        parser.exit()


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; `only`: set up that command's options alone (the others are listed, not loaded)."""
    parser = argparse.ArgumentParser(
        prog="connprobe",
        description="Synthetic probes with kernel evidence: was a failed or slow call DNS, packet loss, a policy "
        "drop, or the upstream itself?",
        epilog="exit codes (every command):\n  0  done, healthy\n  1  a problem found, or the config is invalid\n"
        "  2  usage or environment error\neach command's --help lists its own.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_Version, nargs=0, help="show program's version number and exit")
    sub = _WithExitCodes(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    for name, module_name, help_line in COMMANDS:
        # `connprobe diagnose` through the agent does not pay for importing the agent, the lab or the HTTP clients
        if only is not None and name != only:
            sub.add_parser(name, help=help_line)
            continue
        command = importlib.import_module(f"connprobe.commands.{module_name}")
        extra = {"description": command.DESCRIPTION} if name == "completion" else {}
        p = sub.add_parser(name, help=help_line, **extra)
        command.add_arguments(p)
        run = functools.partial(command.run, parser=parser) if name == "completion" else command.run
        p.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    first = args_list[0] if args_list else None
    # completion introspects every command; `--help` and mistakes need every command too
    only = first if first in COMMAND_NAMES and first != "completion" else None
    parser = build_parser(only)
    args = parser.parse_args(args_list)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `connprobe ... | head`: the reader left; no traceback
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
