"""Extra virtio-serial ports of a Machine (MachineConfig.serial_ports), without a VM."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.boot.hostcaps import Accel
from testbed.boot.machine import Machine, MachineConfig
from testbed.errors import GuestError, TestbedError


def machine(tmp_path: Path, ports: tuple[str, ...]) -> Machine:
    cfg = MachineConfig(kernel=tmp_path / "k", initrd=tmp_path / "i",
                        accel=Accel("tcg", "max", "test"), serial_ports=ports)
    return Machine(cfg, tmp_path)


def test_each_port_is_a_named_virtserialport_on_a_socket_in_the_run_folder(tmp_path: Path):
    m = machine(tmp_path, ("org.testbed.agent", "two"))
    args = m.qemu_args(tmp_path / "i", 5, 6)
    joined = " ".join(args)
    assert "virtserialport,bus=vser0.0,chardev=port0,name=org.testbed.agent" in joined
    assert "virtserialport,bus=vser0.0,chardev=port1,name=two" in joined
    assert "socket,id=port0,path=port-org.testbed.agent.sock,server=on,wait=off" in joined
    assert m.port_path("two") == tmp_path / "port-two.sock"
    with pytest.raises(GuestError, match="no serial port 'three'"):
        m.port_path("three")


def test_no_ports_no_extra_devices(tmp_path: Path):
    assert "chardev=port0" not in " ".join(machine(tmp_path, ()).qemu_args(tmp_path, 5, 6))


@pytest.mark.parametrize("bad", ["a,b", "a b", "", "-x", "a/b", "x" * 65])
def test_port_names_qemu_or_a_file_name_cannot_carry_are_refused(tmp_path: Path, bad: str):
    (tmp_path / "i").write_bytes(b"")
    m = machine(tmp_path, (bad,))
    with pytest.raises(TestbedError, match="serial port name"):
        m.start()
