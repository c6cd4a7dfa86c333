"""Boot-stage logic that needs no VM: kernel headers, accelerator choice, console scanning."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from testbed.boot import console, hostcaps
from testbed.boot.commands import guest_command
from testbed.boot.kernelimage import parse_bzimage
from testbed.boot.machine import MachineConfig, kernel_cmdline
from testbed.errors import TestbedError


def fake_bzimage(version: str) -> bytes:
    data = bytearray(0x1000)
    data[0x202:0x206] = b"HdrS"
    data[0x206:0x208] = bytes([0x0F, 0x02])  # protocol 2.15
    struct.pack_into("<H", data, 0x20E, 0x400)
    data[0x600 : 0x600 + len(version)] = version.encode()
    return bytes(data)


def test_bzimage_version_and_release():
    info = parse_bzimage(fake_bzimage("6.1.0-56-amd64 (x@y) #1 SMP"))
    assert info.protocol == (2, 15)
    assert info.release == "6.1.0-56-amd64"


@pytest.mark.parametrize(
    "data, words",
    [(b"\x7fELF" + b"\0" * 0x300, "ELF file"), (b"root:x:0:0\n" * 100, "not a bzImage")],
)
def test_not_a_kernel(data: bytes, words: str):
    with pytest.raises(TestbedError, match=words):
        parse_bzimage(data, Path("/x"))


def caps(kvm: bool, pku: bool) -> hostcaps.HostCaps:
    return hostcaps.HostCaps(kvm, "probe said so", pku)


def test_accel_prefers_kvm_with_pku():
    a = hostcaps.choose_accel("auto", 5, caps(True, True))
    assert (a.accel, a.cpu) == ("kvm", "host,+pku")


@pytest.mark.parametrize("kvm, pku", [(False, True), (True, False), (False, False)])
def test_accel_falls_back_to_tcg_max(kvm: bool, pku: bool):
    a = hostcaps.choose_accel("auto", 5, caps(kvm, pku))
    assert (a.accel, a.cpu) == ("tcg", "max")
    assert a.reason


def test_accel_paging_4_removes_la57():
    assert hostcaps.choose_accel("tcg", 4).cpu == "max,-la57"
    assert hostcaps.choose_accel("auto", 4, caps(True, True)).cpu == "host,+pku,-la57"


def test_forcing_kvm_where_it_does_not_work_is_an_error():
    with pytest.raises(TestbedError, match="KVM is not usable"):
        hostcaps.choose_accel("kvm", 5, caps(False, True))


def test_pku_flag_parsing():
    assert hostcaps.host_has_pku("flags\t\t: fpu vme pku ospke\n")
    assert not hostcaps.host_has_pku("flags\t\t: fpu vme pkux\n")


def test_probe_firmware_reset_vector():
    fw = hostcaps.probe_firmware()
    assert len(fw) == 0x10000
    assert fw[0xFFF0:0xFFF5] == bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4])


def test_console_scan_finds_panic_ready_and_oops():
    text = (
        "[    0.5] BUG: kernel NULL pointer dereference, address: 0000000000000008\r\n"
        "testbed-ready uptime=1.23\n"
        "[    1.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n"
    )
    st = console.scan(text, "testbed-ready")
    assert st.ready == "testbed-ready uptime=1.23"
    assert st.panic == "Attempted to kill init! exitcode=0x0000000b"
    assert st.oopses and st.oopses[0].startswith("BUG: kernel NULL pointer")
    assert console.scan("booting...\n", "testbed-ready") == console.ConsoleState(None, None, ())


def test_console_tail_strips_control_sequences():
    assert console.tail("a\n/ # \x1b[6n\n\n", 1) == "/ #"


def test_kernel_cmdline_options():
    cfg = MachineConfig(Path("k"), Path("i"), hostcaps.Accel("tcg", "max", ""), paging=4, pti="on",
                        append="rpal.bug=x")
    line = kernel_cmdline(cfg)
    assert "no5lvl" in line.split() and "pti=on" in line.split() and line.endswith("rpal.bug=x")


def test_guest_command_quotes_and_keeps_shell():
    assert guest_command(["sh", "-c", "exit 7"]) == "sh -c 'exit 7'\nexit $?"


def test_checkpoint_request_parsing():
    from testbed.boot.machine import Checkpoint, parse_checkpoint_request

    assert parse_checkpoint_request(b"checkpoint one 12 13\n") == Checkpoint("one", 12, 13)
    ck = parse_checkpoint_request(b"checkpoint two 1 2 rpal_id=3 pkey=4\n")
    assert ck.facts == {"rpal_id": "3", "pkey": "4"}
    for bad in (b"checkpoint one 12\n", b"hello one 1 2\n", b"checkpoint a b c\n",
                b"checkpoint a 1 2 novalue\n"):
        with pytest.raises(ValueError):
            parse_checkpoint_request(bad)


def test_kernel_option_takes_paths_and_cache_keys(tmp_path: Path, monkeypatch):
    from testbed.boot.kernelimage import resolve_kernel
    from testbed.errors import BuildError

    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    assert resolve_kernel("/boot/nonexistent") == Path("/boot/nonexistent")
    assert resolve_kernel("bzImage") == Path("bzImage")  # not hex: a relative path
    with pytest.raises(BuildError, match="no cached kernel build abcdef"):
        resolve_kernel("abcdef")
