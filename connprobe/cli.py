"""The `connprobe` command line. Each subcommand's work lives in its own module; this file only parses."""

from __future__ import annotations

import argparse
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="connprobe",
        description="Synthetic probes with kernel evidence: was a failed or slow call DNS, packet loss, a policy "
        "drop, or the upstream itself?",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    check.set_defaults(func=_check_config)

    agent = sub.add_parser("agent", help="run the probes continuously; serve /metrics, /probe and a status page")
    from connprobe.agent import add_arguments as add_agent_arguments

    add_agent_arguments(agent)
    agent.set_defaults(func=_agent)

    demo = sub.add_parser("demo", help="run the agent on the lab with faults switching on and off; show verdicts")
    from connprobe.demo import add_arguments as demo_arguments

    demo_arguments(demo)
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
