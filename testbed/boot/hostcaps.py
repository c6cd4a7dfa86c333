"""What this host can run: KVM or TCG, PKU, and the QEMU accelerator/CPU choice.

A present /dev/kvm is not proof that KVM works (nested KVM can open the
device and still fail to run a guest), so the probe starts a tiny guest:
a 64 KiB firmware whose reset vector writes to QEMU's isa-debug-exit port.
QEMU exits with status (value << 1) | 1 only if the guest really ran.
The result is cached per host boot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed import paths
from testbed.errors import TestbedError

QEMU = os.environ.get("TESTBED_QEMU", "qemu-system-x86_64")
_EXIT_VALUE = 0x2A  # written by the probe guest; QEMU exits with (0x2a << 1) | 1
PROBE_TIMEOUT = 10.0


def probe_firmware() -> bytes:
    """A 64 KiB BIOS image: at the reset vector, `mov al, 0x2a; out 0xf4, al; hlt`."""
    code = bytes([0xB0, _EXIT_VALUE, 0xE6, 0xF4, 0xF4])
    return b"\xf4" * (0x10000 - 16) + code + b"\xf4" * (16 - len(code))


def host_has_pku(cpuinfo: str | None = None) -> bool:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "pku" in line.split(":", 1)[1].split()
    return False


def _qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        raise TestbedError(f"{QEMU} not found: run `testbed setup` (installs qemu-system-x86)")
    return path


def run_probe(accel: str, cpu: str) -> tuple[bool, str]:
    """Start the probe guest with this accelerator and CPU; (worked, reason)."""
    with tempfile.TemporaryDirectory(prefix="testbed-probe-") as tmp:
        fw = Path(tmp) / "probe.bin"
        fw.write_bytes(probe_firmware())
        cmd = [
            _qemu_binary(), "-accel", accel, "-cpu", cpu, "-machine", "pc", "-m", "16",
            "-nodefaults", "-display", "none", "-no-user-config", "-bios", str(fw),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=PROBE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return False, f"a test guest under {accel} hung for {PROBE_TIMEOUT:.0f} s"
        lines = res.stderr.splitlines()
        missing = [ln for ln in lines if "doesn't support requested feature" in ln]
        if res.returncode == (_EXIT_VALUE << 1) | 1:
            if missing:
                feature = missing[0].split("feature:", 1)[-1].strip()
                return False, f"{accel} runs guests but cannot give them {feature}"
            return True, f"a test guest ran under {accel}"
        err = " ".join(res.stderr.split())[:200] or f"exit status {res.returncode}"
        return False, f"a test guest under {accel} failed: {err}"


GUEST_KERNEL_PARAMS = ("no_timer_check", "acpi=noirq")
"""Kernel parameters of every guest the testbed boots (and of the boot probe).

no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check can
time out and panic ("IO-APIC + timer doesn't work!"), as cloud images know.
acpi=noirq: PCI interrupts routed from the BIOS's $PIR table instead of ACPI
link devices. Under TCG setting up the ACPI links took 340-470 ms per PCI
device (initcall_debug: about 1.1 s of a 2.8 s boot to /init with our three
virtio devices), the $PIR route 2-9 ms.
"""


def kernel_boots(
    accel: str, cpu: str, kernel: Path, initrd: Path, timeout: float = 30.0
) -> tuple[bool, str]:
    """Boot `kernel` to its first user process (busybox poweroff -f) under `accel`.

    The firmware probe can pass where a real kernel hangs (nested KVM does
    this), so KVM is trusted only after a kernel got to user space with it.
    """
    cmd = [
        _qemu_binary(), "-accel", accel, "-cpu", cpu, "-m", "256", "-smp", "2",
        "-nodefaults", "-display", "none", "-no-user-config", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initrd),
        "-append",
        " ".join(["console=ttyS0 panic=-1 quiet", *GUEST_KERNEL_PARAMS,
                  "rdinit=/sbin/poweroff -- -f"]),
    ]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"a kernel under {accel} did not reach user space in {timeout:.0f} s"
    if res.returncode == 0:
        return True, f"a kernel booted to user space under {accel}"
    err = " ".join(res.stderr.split())[:200] or f"exit status {res.returncode}"
    return False, f"a kernel under {accel} failed: {err}"


@dataclass(frozen=True)
class HostCaps:
    kvm_usable: bool
    kvm_reason: str
    host_pku: bool


def _cache_file() -> Path:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "unknown"
    return paths.cache_dir() / "hostcaps" / f"{boot_id}.json"


def detect(*, refresh: bool = False) -> HostCaps:
    cache = _cache_file()
    if not refresh and cache.exists():
        try:
            return HostCaps(**json.loads(cache.read_text()))
        except (ValueError, TypeError):
            pass
    pku = host_has_pku()
    if not os.path.exists("/dev/kvm"):
        caps = HostCaps(False, "/dev/kvm does not exist", pku)
    elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
        caps = HostCaps(False, "/dev/kvm is not accessible to this user", pku)
    else:
        ok, why = run_probe("kvm", "host,+pku" if pku else "host")
        caps = HostCaps(ok, why, pku)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(asdict(caps)))
    return caps


@dataclass(frozen=True)
class Accel:
    """The QEMU accelerator and CPU model chosen for a run, and why."""

    accel: str  # "kvm" or "tcg"
    cpu: str  # QEMU -cpu value
    reason: str

    def describe(self) -> str:
        return f"-accel {self.accel} -cpu {self.cpu}: {self.reason}"


def kvm_boots_cached(cpu: str, kernel: Path, initrd: Path) -> tuple[bool, str]:
    """kernel_boots under KVM, remembered per host boot, kernel and initrd."""
    ident = "|".join(str(p.resolve()) + f"@{p.stat().st_mtime_ns}" for p in (kernel, initrd))
    cache = _cache_file().with_suffix(".kernels.json")
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    key = f"{cpu}|{ident}"
    if key not in known:
        known[key] = list(kernel_boots("kvm", cpu, kernel, initrd))
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known))
    ok, why = known[key]
    return bool(ok), str(why)


def choose_accel(
    want: str = "auto",
    paging: int = 5,
    caps: HostCaps | None = None,
    boot_check: tuple[Path, Path] | None = None,
) -> Accel:
    """Pick kvm+host,+pku where KVM and PKU work, else tcg+max; honour a forced choice.

    `paging` 4 removes LA57 from the CPU so the guest uses 4-level paging.
    `boot_check` (kernel, initrd): before choosing KVM on its own, make sure
    that kernel reaches user space under KVM.
    """
    if want not in ("auto", "kvm", "tcg"):
        raise TestbedError(f"--accel {want}: choose kvm, tcg or auto")
    if paging not in (4, 5):
        raise TestbedError(f"--paging {paging}: choose 4 or 5")
    la57 = "" if paging == 5 else ",-la57"
    if want == "tcg":
        return Accel("tcg", "max" + la57, "TCG forced by --accel tcg")
    caps = caps or detect()
    if want == "kvm":
        if not caps.kvm_usable:
            raise TestbedError(f"--accel kvm, but KVM is not usable here: {caps.kvm_reason}")
        if not caps.host_pku:
            raise TestbedError("--accel kvm, but the host CPU has no PKU: use --accel tcg")
        return Accel("kvm", "host,+pku" + la57, "KVM forced by --accel kvm")
    if caps.kvm_usable and caps.host_pku:
        cpu = "host,+pku" + la57
        if boot_check is not None:
            ok, why = kvm_boots_cached(cpu, *boot_check)
            if not ok:
                return Accel("tcg", "max" + la57, f"KVM not usable ({why}): TCG emulates PKU")
        return Accel("kvm", cpu, f"KVM works ({caps.kvm_reason}) and the host has PKU")
    if caps.kvm_usable:
        return Accel("tcg", "max" + la57, "KVM works but the host CPU has no PKU: TCG emulates it")
    return Accel("tcg", "max" + la57, f"KVM not usable ({caps.kvm_reason}): TCG emulates PKU")
