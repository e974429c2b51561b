"""The commands of `connprobe`, one module each (`agent`, `diagnose`, `check_config`, `doctor`, `lab`, `demo`,
`completion`). A command parses its arguments (`add_arguments(parser)`), calls the library with typed
arguments, prints, and returns its exit code (`run(args) -> int`). Only `connprobe/cli.py` imports them (an
import-linter contract in pyproject.toml); the library never does.

To add a command: a module here with `add_arguments` and `run`, a row in `connprobe/cli.py`'s `COMMANDS` (name,
module, help line) and its `EXIT_CODES` there, and its section in README.md.
"""
