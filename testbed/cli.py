"""The `testbed` command line: one subcommand per stage of build -> boot -> snapshot -> check."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from testbed.errors import EXIT_TESTBED_ERROR, EXIT_USAGE, Interrupted, TestbedError, UsageError

# Each entry adds one or more subcommands; the module that owns the work owns its parser.
Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Registrar]:
    regs: list[Registrar] = []
    from testbed import sysdeps

    regs.append(sysdeps.add_parser)
    from testbed.build import kernel_cli

    regs.append(kernel_cli.add_parser)
    from testbed.boot import commands as boot_commands

    regs.append(boot_commands.add_parsers)
    from testbed.snapshot import commands as snapshot_commands

    regs.append(snapshot_commands.add_parser)
    from testbed.check import selftests

    regs.append(selftests.add_parser)
    from testbed import run_commands

    regs.append(run_commands.add_parsers)
    from testbed.report import cli as report_cli

    regs.append(report_cli.add_parser)
    from testbed.designs.rpal.explore import cli as explore_cli

    regs.append(explore_cli.add_parser)
    return regs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description="Boot kernels under QEMU and verify RPAL page tables, keys and TLB shootdowns.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for reg in _registrars():
        reg(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from testbed.report.cli import route

    parser = build_parser()
    args = parser.parse_args(route(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args) or 0)
    except TestbedError as exc:
        line = exc.one_line()
        print(f"testbed: error: {line}", file=sys.stderr)
        if exc.run_dir is not None and exc.run_dir.is_dir():
            (exc.run_dir / "error.txt").write_text(line + "\n")
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_TESTBED_ERROR
    except KeyboardInterrupt as exc:
        print("testbed: interrupted", file=sys.stderr)
        return exc.exit_status if isinstance(exc, Interrupted) else 130
