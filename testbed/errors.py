"""Errors the testbed reports to users as one line, without a traceback."""

from __future__ import annotations

from pathlib import Path

# Exit status of the testbed itself when it fails (as docker/podman do), so it
# can be told apart from the status of a guest command passed through.
EXIT_TESTBED_ERROR = 125
EXIT_USAGE = 2  # as argparse: the command line asked for something that makes no sense


class TestbedError(Exception):
    """A failure with a one-line message naming the thing and what to do.

    ``run_dir`` is the artifact folder kept for the user, when there is one.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, message: str, *, run_dir: Path | None = None) -> None:
        super().__init__(message)
        self.run_dir = run_dir

    def one_line(self) -> str:
        msg = " ".join(str(self).split())
        if self.run_dir is not None:
            msg += f" (artifacts kept in {self.run_dir})"
        return msg


class UsageError(TestbedError):
    """An option value that makes no sense; exit status 2, nothing was started."""


class SetupError(TestbedError):
    """The host lacks something the setup step must install."""


class BuildError(TestbedError):
    """Building a kernel, guest program or image failed."""


class GuestError(TestbedError):
    """The guest panicked, hung, or QEMU failed."""


class GuestPanic(GuestError):
    pass


class GuestTimeout(GuestError):
    pass


class QemuCrash(GuestError):
    pass


class GuestStuck(GuestError):
    """The guest was paused for a snapshot and could not be resumed."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived; the testbed exits with 128 + signum."""

    def __init__(self, signum: int = 2) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        import signal

        try:
            return signal.Signals(self.signum).name
        except ValueError:
            return f"signal {self.signum}"
