"""Real kernel builds from Debian's linux-source-6.1 (minutes cold, seconds when cached).

They use the normal cache (``$TESTBED_CACHE`` or ~/.cache/testbed), so the base
tree and object folders are shared with the user's builds and a second run is
quick. Run with TESTBED_SLOW=1.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from testbed.build import kernel
from testbed.build.kernel_source import DEBIAN_TARBALL
from testbed.errors import BuildError

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not DEBIAN_TARBALL.is_file(), reason="linux-source-6.1 not installed"),
]


def sections(vmlinux: Path) -> set[str]:
    out = subprocess.run(["readelf", "-SW", str(vmlinux)], capture_output=True, text=True,
                         check=True).stdout
    return {w for line in out.splitlines() for w in line.split() if w.startswith(".")}


def test_base_build_then_cache_hit(runs_dir: Path) -> None:
    kb = kernel.build_kernel(jobs=2)
    assert kb.bzimage.stat().st_size > 500_000
    assert {".BTF", ".debug_info"} <= sections(kb.vmlinux)
    cfg = kb.config.read_text()
    for line in ("CONFIG_X86_5LEVEL=y", "CONFIG_X86_INTEL_MEMORY_PROTECTION_KEYS=y",
                 "CONFIG_PAGE_TABLE_ISOLATION=y", "CONFIG_DEBUG_INFO_BTF=y", "CONFIG_ACPI=y",
                 "CONFIG_CRASH_CORE=y", "CONFIG_FW_CFG_SYSFS=y"):
        assert line in cfg
    assert "CONFIG_RANDOMIZE_BASE=y" not in cfg
    assert kb.base_version.startswith("linux-source-6.1 ")
    assert "make kernelversion 6.1." in kb.base_version
    t0 = time.monotonic()
    again = kernel.build_kernel(jobs=2)
    assert again.cached and again.key == kb.key
    assert time.monotonic() - t0 < 5
    assert any(r["key"] == kb.key for r in kernel.list_cached())


def test_option_that_does_not_stick_on_the_real_tree(runs_dir: Path) -> None:
    with pytest.raises(BuildError) as exc:
        kernel.build_kernel(config_fragments=["CONFIG_KVM_AMD=y"], jobs=2)
    msg = exc.value.one_line()
    assert "config option did not stick: CONFIG_KVM_AMD=y" in msg
    assert "unmet dependency" in msg and "KVM" in msg.split("unmet dependency", 1)[1]


PATCH = "".join(line + "\n" for line in [
    "diff --git a/init/main.c b/init/main.c",
    "--- a/init/main.c",
    "+++ b/init/main.c",
    "@@ -1509,6 +1509,7 @@ static int __ref kernel_init(void *unused)",
    " ",
    " \tdo_sysctl_args();",
    " ",
    '+\tpr_info("testbed series marker {marker}\\n");',
    " \tif (ramdisk_execute_command) {{",
    " \t\tret = run_init_process(ramdisk_execute_command);",
    " \t\tif (!ret)",
])


def test_changing_one_patch_rebuilds_incrementally(tmp_path: Path, runs_dir: Path) -> None:
    series = tmp_path / "marker"
    series.mkdir()
    (series / "series").write_text("# one patch\n0001-marker.patch -p1\n")
    builds = []
    for marker in ("one", "two"):
        (series / "0001-marker.patch").write_text(PATCH.format(marker=marker))
        builds.append(kernel.build_kernel(series=series, jobs=2))
    first, second = builds
    assert first.key != second.key
    assert second.meta["incremental"] is True
    print(f"incremental make: {second.meta['make_seconds']} s")  # a time, not an assertion
    assert b"testbed series marker two" in second.vmlinux.read_bytes()
    assert second.meta["series"]["patches"][0]["name"] == "0001-marker.patch"
    for kb in builds:  # 115 MB each: do not leave test kernels in the user's cache
        shutil.rmtree(kb.dir, ignore_errors=True)


def test_broken_patch_against_the_real_tree(tmp_path: Path, runs_dir: Path) -> None:
    series = tmp_path / "broken"
    series.mkdir()
    (series / "series").write_text("0001-broken.patch\n")
    (series / "0001-broken.patch").write_text(
        PATCH.format(marker="x").replace("do_sysctl_args();", "do_something_else();"))
    with pytest.raises(BuildError, match=r"patch does not apply: broken: 0001-broken.patch \(#1\)"
                                         r": first rejected hunk init/main.c: @@ -1509,6 "):
        kernel.build_kernel(series=series, jobs=2)
    src = next((kernel.work_dir()).glob("tar-*/src"))
    st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=src,
                        capture_output=True, text=True, check=True).stdout
    assert st == ""
