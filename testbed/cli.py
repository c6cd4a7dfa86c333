"""The `testbed` command line: one subcommand per stage of build -> boot -> snapshot -> check."""

from __future__ import annotations

import argparse
import os
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
    # `testbed report RUN_DIR` (judge) and `testbed report merge` (report/merge.py)
    from testbed.report import cli as report_cli

    regs.append(report_cli.add_parser)
    from testbed import replay

    regs.append(replay.add_parser)
    from testbed.designs.rpal.explore import cli as explore_cli

    regs.append(explore_cli.add_parser)
    from testbed.designs.rpal.security import cli as security_cli

    regs.append(security_cli.add_parser)
    return regs


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("testbed")
    except PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def _verbosity_options(p: argparse.ArgumentParser, *, top: bool) -> None:
    # on the top level and on every subcommand: `testbed -q run` and `testbed run -q`;
    # a subcommand's default must not overwrite the top level's (SUPPRESS)
    default = 0 if top else argparse.SUPPRESS
    have = p._option_string_actions  # a subcommand's own -v (setup, selftest) stays its own
    if "-v" not in have:
        p.add_argument("-v", "--verbose", action="count", default=default,
                       help="more progress detail (every step, at most once a second)")
    if "-q" not in have:
        p.add_argument("-q", "--quiet", action="count", default=default,
                       help="no progress lines, no per-scenario lines: the summary and errors")


def _add_verbosity_everywhere(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _verbosity_options(sub, top=False)
                _add_verbosity_everywhere(sub)


EPILOG = """\
exit status: 0 all passed; 1 a check failed; 2 usage error; 125 the testbed could not
judge (no kernel, boot failure, guest panic before the workload, QEMU crash); 130/143
interrupted (SIGINT/SIGTERM). `testbed exec` exits with the guest command's status.
Environment variables: see the README's table (TESTBED_RUNS, TESTBED_CACHE, TESTBED_KERNEL,
TESTBED_PROGRESS, TESTBED_HEARTBEAT, CI, NO_COLOR, ...)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testbed",
        description="Boot kernels under QEMU and verify RPAL page tables, keys and TLB shootdowns.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"testbed {_version()}")
    _verbosity_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for reg in _registrars():
        reg(sub)
    _add_verbosity_everywhere(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from testbed.report.cli import route

    parser = build_parser()
    try:  # shell completion (activate with: eval "$(register-python-argcomplete testbed)")
        import argcomplete

        argcomplete.autocomplete(parser)
    except ImportError:  # pragma: no cover - a declared dependency
        pass
    args = parser.parse_args(route(sys.argv[1:] if argv is None else argv))
    from testbed.progress import set_verbosity

    set_verbosity(1 if args.verbose else -1 if args.quiet else 0)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `testbed list | head`: the reader left, nothing to say
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - no flush error at exit
        except OSError:
            pass
        return 0
    except TestbedError as exc:
        line = exc.one_line()
        print(f"testbed: error: {line}", file=sys.stderr)
        if exc.run_dir is not None and exc.run_dir.is_dir():
            (exc.run_dir / "error.txt").write_text(line + "\n")
        return EXIT_USAGE if isinstance(exc, UsageError) else EXIT_TESTBED_ERROR
    except KeyboardInterrupt as exc:
        print("testbed: interrupted", file=sys.stderr)
        return exc.exit_status if isinstance(exc, Interrupted) else 130
