"""System setup: install the Debian packages the testbed needs (idempotent).

`testbed setup` checks with dpkg-query first, so it costs a fraction of a
second when everything is present, and only then runs apt-get for what is
missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from typing import Any

from testbed.errors import SetupError

# Debian package -> why the testbed needs it.
PACKAGES: dict[str, str] = {
    "qemu-system-x86": "runs the guests",
    "qemu-utils": "QEMU helper tools",
    "busybox-static": "the guest userland in the initramfs",
    "dropbear-bin": "SSH server in the initramfs",
    "gcc": "builds the static guest programs",
    "libc6-dev": "static C library for the guest programs",
    "make": "kernel builds",
    "binutils": "kernel builds (ld, objcopy)",
    "cpio": "inspecting initramfs images",
    "linux-image-amd64": "the default guest kernel",
    "linux-source-6.1": "base tree for patched kernels",
    "flex": "kernel builds",
    "bison": "kernel builds",
    "bc": "kernel builds",
    "libelf-dev": "kernel builds (objtool)",
    "libssl-dev": "kernel builds (signing tools)",
    "dwarves": "pahole, for kernel BTF",
    "lz4": "kernel builds (LZ4-compressed bzImage)",
    "xz-utils": "unpacking linux-source",
    "git": "applying patch series",
    "kmod": "module dependency data",
    "python3-venv": "the project's virtual environment",
    "openssh-client": "ssh into a guest kept up by `testbed boot`",
    "gdb": "the security review's watch of ENABLE through QEMU's gdbstub (row enable_window)",
}


def missing_packages(packages: list[str]) -> list[str]:
    """Packages of `packages` that dpkg does not report as installed."""
    if shutil.which("dpkg-query") is None:
        raise SetupError("dpkg-query not found: the setup step needs a Debian host (Debian 12)")
    out = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Package}\t${db:Status-Abbrev}\n", *packages],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    installed = {
        line.split("\t")[0].split(":")[0]
        for line in out.splitlines()
        if "\t" in line and line.split("\t")[1].startswith("ii")
    }
    return [p for p in packages if p not in installed]


def install(packages: list[str] | None = None, *, quiet: bool = True) -> list[str]:
    """Install what is missing; return the packages that were installed."""
    wanted = packages or list(PACKAGES)
    missing = missing_packages(wanted)
    if not missing:
        return []
    if shutil.which("apt-get") is None:
        raise SetupError(f"apt-get not found; install these packages by hand: {' '.join(missing)}")
    if os.geteuid() != 0:
        raise SetupError(
            f"missing Debian packages {' '.join(missing)}: run `sudo testbed setup` (needs root)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    q = ["-q"] if quiet else []
    for cmd in (
        ["apt-get", *q, "update"],
        ["apt-get", *q, "install", "-y", "--no-install-recommends", *missing],
    ):
        res = subprocess.run(cmd, env=env, capture_output=quiet, text=True, check=False)
        if res.returncode != 0:
            tail = (res.stderr or "").strip().splitlines()[-1:] if quiet else []
            raise SetupError(
                f"`{' '.join(cmd[:3])} ...` failed with status {res.returncode}"
                + (f": {tail[0]}" if tail else "")
            )
    still = missing_packages(missing)
    if still:
        raise SetupError(f"apt-get finished but these are still missing: {' '.join(still)}")
    return missing


def _cmd_setup(args: argparse.Namespace) -> int:
    installed = install(quiet=not args.verbose)
    if installed:
        print(f"installed: {' '.join(installed)}")
    else:
        print("all system packages present")
    return 0


def main() -> int:
    """Entry point for the bootstrap script, before the virtual environment exists."""
    import sys

    try:
        installed = install()
    except SetupError as exc:
        print(f"testbed setup: error: {exc.one_line()}", file=sys.stderr)
        return 1
    print(f"testbed setup: installed {' '.join(installed)}" if installed else
          "testbed setup: all system packages present")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def add_parser(sub: Any) -> None:
    p = sub.add_parser("setup", help="install the Debian packages the testbed needs (idempotent)")
    p.add_argument("-v", "--verbose", action="store_true", help="show apt-get output")
    p.set_defaults(func=_cmd_setup)
