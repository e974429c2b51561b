"""The `connprobe` command line. Each subcommand's work lives in its own module; this file only parses.

Exit codes are the same across commands: 0 done (healthy), 1 the thing checked is bad (a probe found a
problem, the config is invalid, a kernel check failed), 2 a usage or environment error (a bad option, a file
that cannot be read, a namespace that does not exist, an address that cannot be listened on). Each
command's `--help` lists its own (`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import os
import sys


def _lab(args: argparse.Namespace) -> int:
    from connprobe.lab.cli import run

    return run(args)


def _demo(args: argparse.Namespace) -> int:
    from connprobe.demo import run

    return run(args)


def _diagnose(args: argparse.Namespace) -> int:
    from connprobe.diagnose import run

    return run(args)


def _doctor(args: argparse.Namespace) -> int:
    from connprobe.doctor import run

    return run(args)


def _check_config(args: argparse.Namespace) -> int:
    from connprobe.config import check_config_main

    return check_config_main(args)


def _agent(args: argparse.Namespace) -> int:
    from connprobe.agent import run

    return run(args)


def _completion(args: argparse.Namespace) -> int:
    import shtab

    sys.stdout.write(shtab.complete(build_parser(), shell=args.shell))
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    from connprobe.version import version_text

    parser = argparse.ArgumentParser(
        prog="connprobe",
        description="Synthetic probes with kernel evidence: was a failed or slow call DNS, packet loss, a policy "
        "drop, or the upstream itself?",
        epilog="exit codes (every command):\n  0  done, healthy\n  1  a problem found, or the config is invalid\n"
        "  2  usage or environment error\neach command's --help lists its own.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=version_text())
    sub = _WithExitCodes(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    lab = sub.add_parser("lab", help="bring the built-in network lab up or down, or show it")
    lab.add_argument("action", choices=["up", "down", "status"])
    lab.add_argument("--id", help="lab id (default: a new one for up; for down, the only running lab)")
    lab.add_argument("--all", action="store_true", help="with down: remove every lab, stale ones included")
    lab.set_defaults(func=_lab)

    diag = sub.add_parser("diagnose", help="probe a target with the kernel sensor attached and say why it fails")
    from connprobe.diagnose import add_arguments

    add_arguments(diag)
    diag.set_defaults(func=_diagnose)

    doctor = sub.add_parser("doctor", help="check root, BPF, BTF, tracefs, headers and each tracepoint")
    from connprobe.doctor import add_arguments as doctor_arguments

    doctor_arguments(doctor)
    doctor.set_defaults(func=_doctor)

    check = sub.add_parser("check-config", help="validate a config file without running it")
    check.add_argument("file", help="the YAML config")
    check.add_argument("--blackbox", action="store_true",
                       help="FILE is a blackbox_exporter blackbox.yml (modules only, blackbox's defaults)")
    check.set_defaults(func=_check_config)

    agent = sub.add_parser("agent", help="run the probes continuously; serve /metrics, /probe and a status page")
    from connprobe.agent import add_arguments as add_agent_arguments

    add_agent_arguments(agent)
    agent.set_defaults(func=_agent)

    demo = sub.add_parser("demo", help="run the agent on the lab with faults switching on and off; show verdicts")
    from connprobe.demo import add_arguments as demo_arguments

    demo_arguments(demo)
    demo.set_defaults(func=_demo)

    completion = sub.add_parser("completion", help="print a shell completion script (bash or zsh)",
                                description="Print a completion script for connprobe.\n"
                                "  bash: source <(connprobe completion bash)   (or save it in "
                                "/etc/bash_completion.d/connprobe)\n"
                                "  zsh:  connprobe completion zsh > \"${fpath[1]}/_connprobe\"")
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(func=_completion)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
