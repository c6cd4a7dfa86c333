"""What a kernel needs for the RPAL scenarios, told before any guest boots."""

from __future__ import annotations

from pathlib import Path

from testbed.errors import TestbedError

# What only a kernel with RPAL (CONFIG_RPAL) has: the code behind /proc/rpal, and its
# service type (in the kernel's BTF, which the testbed needs anyway).
RPAL_SYMBOLS = ("rpal_init", "rpal_proc_ops")
RPAL_TYPE = "rpal_service"


def requires(kernel: Path) -> None:
    """Refuse a kernel the scenarios cannot run on: one without RPAL (no /proc/rpal).

    Told from its System.map or vmlinux when it has real ones, else from its BTF
    (Debian's System.map in /boot is a placeholder); a kernel with neither is let
    through (later stages say why they cannot read it).
    """
    from testbed.snapshot.btf import BtfError
    from testbed.snapshot.kernel_image import KernelImage, KernelImageError

    try:
        image = KernelImage.from_paths(kernel)
        symbols = image.symbols
        if symbols is not None and len(symbols) > 0:
            has = any(name in symbols for name in RPAL_SYMBOLS)
            where = f"none of {', '.join(RPAL_SYMBOLS)} in its symbols"
        else:
            has = bool(image.btf.ids(RPAL_TYPE))
            where = f"no struct {RPAL_TYPE} in its BTF"
    except (KernelImageError, BtfError, OSError):
        return
    if not has:
        raise TestbedError(f"kernel {kernel} has no RPAL ({where}, so no /proc/rpal; "
                           "CONFIG_RPAL?): pass a kernel built with the RPAL series "
                           "(testbed kernel build)")
