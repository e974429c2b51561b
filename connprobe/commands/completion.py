"""`connprobe completion bash|zsh`: a shell completion script generated from the command line's own parser."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = ("Print a completion script for connprobe.\n"
               "  bash: source <(connprobe completion bash)   (or save it in /etc/bash_completion.d/connprobe)\n"
               "  zsh:  connprobe completion zsh > \"${fpath[1]}/_connprobe\"")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=["bash", "zsh"])


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import shtab

    sys.stdout.write(shtab.complete(parser, shell=args.shell))
    return 0
