"""Image building: reproducible bytes, content-hash cache, module dependency order."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.boot.kernelimage import default_kernel, inspect_kernel
from testbed.build import initramfs
from testbed.errors import BuildError


def test_same_inputs_same_bytes_across_fresh_caches(tmp_path: Path, monkeypatch):
    spec = initramfs.ImageSpec(kernel=inspect_kernel(default_kernel()))
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "c1"))
    first = initramfs.build_image(spec)
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "c2"))
    second = initramfs.build_image(spec)
    assert first.path != second.path
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.key == second.key


def test_different_inputs_different_image(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path))
    extra = tmp_path / "note.txt"
    extra.write_text("one")
    a = initramfs.build_image(initramfs.ImageSpec(extra_files={"etc/note": extra}))
    extra.write_text("two")
    b = initramfs.build_image(initramfs.ImageSpec(extra_files={"etc/note": extra}))
    assert a.key != b.key


def write_moddir(tmp_path: Path, dep: str, builtin: str = "") -> Path:
    (tmp_path / "modules.dep").write_text(dep)
    (tmp_path / "modules.builtin").write_text(builtin)
    return tmp_path


def test_module_order_loads_dependencies_first(tmp_path: Path):
    moddir = write_moddir(
        tmp_path,
        "kernel/a/net.ko: kernel/a/fo.ko kernel/b/virtio.ko\nkernel/a/fo.ko:\n"
        "kernel/b/virtio.ko:\nkernel/b/pv-mmio.ko: kernel/b/pv.ko\nkernel/b/pv.ko:\n",
        "kernel/c/virtio_console.ko\n",
    )
    order, builtin = initramfs.module_load_order(moddir, ["net", "pv_mmio", "virtio_console"])
    assert order.index("kernel/a/fo.ko") < order.index("kernel/a/net.ko")
    assert order.index("kernel/b/virtio.ko") < order.index("kernel/a/net.ko")
    assert order.index("kernel/b/pv.ko") < order.index("kernel/b/pv-mmio.ko")
    assert builtin == ["virtio_console"]


def test_module_loop_and_unknown_module_are_errors(tmp_path: Path):
    moddir = write_moddir(tmp_path, "a.ko: b.ko\nb.ko: a.ko\n")
    with pytest.raises(BuildError, match="loop"):
        initramfs.module_load_order(moddir, ["a"])
    with pytest.raises(BuildError, match="neither"):
        initramfs.module_load_order(moddir, ["nosuch"])


def test_rcs_template_loads_modules_and_prints_ready():
    spec = initramfs.ImageSpec(kernel=inspect_kernel(default_kernel()), guest_programs=False)
    entries, loaded = initramfs.image_entries(spec)
    rcs = next(e for e in entries if e.path == "etc/init.d/rcS").data.decode()
    assert loaded and all(f"insmod /{m}" in rcs for m in loaded)
    assert initramfs.READY_MARKER in rcs
    paths = {e.path for e in entries}
    assert {"init", "bin/busybox", "usr/sbin/dropbear", "dev/console"} <= paths
