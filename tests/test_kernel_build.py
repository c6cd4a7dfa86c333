"""Kernel build pipeline without building a kernel: series, config checks, cache keys."""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from testbed.build import kconfig, kernel, kernel_cli
from testbed.build.kernel_source import prepare_repo, resolve_source
from testbed.build.series import (
    Patch,
    apply_series,
    describe_failure,
    load_mbox,
    load_quilt_series,
    load_series,
    parse_hunks,
    parse_series_text,
)
from testbed.errors import BuildError
from testbed.progress import Progress

from conftest import run_testbed

# --------------------------------------------------------------------------- helpers


def git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True,
                          text=True).stdout


def toy_repo(tmp_path: Path) -> tuple[Path, str]:
    """A small git repo standing in for a kernel tree; returns (repo, base commit)."""
    repo = tmp_path / "tree"
    repo.mkdir()
    (repo / "Makefile").write_text("all:\n\t@true\n")
    (repo / "Kconfig").write_text("config FOO\n\tbool \"foo\"\n")
    (repo / "mm").mkdir()
    (repo / "mm" / "mmap.c").write_text("".join(f"line {i}\n" for i in range(1, 41)))
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    return repo, git(repo, "rev-parse", "HEAD").strip()


def make_diff(repo: Path, path: str, new_text: str) -> bytes:
    """A git diff changing ``path`` to ``new_text`` (not left in the tree)."""
    old = (repo / path).read_text() if (repo / path).exists() else None
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    (repo / path).write_text(new_text)
    git(repo, "add", "-N", path)
    diff = subprocess.run(["git", "diff", "--", path], cwd=repo, check=True,
                          capture_output=True).stdout
    git(repo, "reset", "-q", "--", path)
    if old is None:
        (repo / path).unlink()
    else:
        (repo / path).write_text(old)
    return diff


def quilt_dir(tmp_path: Path, patches: dict[str, bytes], series: str, name: str = "s") -> Path:
    d = tmp_path / name
    d.mkdir()
    for fname, text in patches.items():
        (d / fname).write_bytes(text)
    (d / "series").write_text(series)
    return d


def status(repo: Path) -> str:
    return git(repo, "status", "--porcelain", "--untracked-files=all")


# --------------------------------------------------------------------------- series parsing


def test_series_file_comments_blank_lines_and_options() -> None:
    text = """# the RPAL series
0001-first.patch

0002-second.patch -p0   # trailing comment
  0003-third.patch -p2 -R
# 0004-disabled.patch
0005-fifth.patch -p 1
"""
    entries = parse_series_text(text)
    assert [(e.name, e.strip, e.reverse) for e in entries] == [
        ("0001-first.patch", 1, False),
        ("0002-second.patch", 0, False),
        ("0003-third.patch", 2, True),
        ("0005-fifth.patch", 1, False),
    ]
    assert entries[1].line == 4


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("-p1 0001.patch\n", "expected a patch name"),
        ("0001.patch --fuzz=3\n", "unsupported option '--fuzz=3'"),
        ("0001.patch\n0001.patch\n", "listed twice"),
    ],
)
def test_malformed_series_file_is_one_line_error(text: str, fragment: str) -> None:
    with pytest.raises(BuildError) as exc:
        parse_series_text(text, where="x/series")
    msg = exc.value.one_line()
    assert "malformed series file x/series:" in msg
    assert fragment in msg
    assert "\n" not in msg


def test_missing_patch_file_names_it(tmp_path: Path) -> None:
    d = quilt_dir(tmp_path, {"a.patch": b"diff --git a/x b/x\n"}, "a.patch\nb.patch\n")
    with pytest.raises(BuildError, match=r"series:2 names b.patch, which does not exist"):
        load_quilt_series(d)


def test_folder_without_series_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="has no 'series' file"):
        load_series(tmp_path / "empty")


def test_patch_without_diff_is_malformed(tmp_path: Path) -> None:
    d = quilt_dir(tmp_path, {"a.patch": b"just words\n"}, "a.patch\n")
    with pytest.raises(BuildError, match="contains no diff"):
        load_quilt_series(d)


def test_named_series_resolves_under_patches_dir(tmp_path: Path) -> None:
    pdir = tmp_path / "kernel-patches"
    pdir.mkdir()
    d = quilt_dir(pdir, {"a.patch": b"diff --git a/x b/x\n--- a/x\n+++ b/x\n"}, "a.patch\n",
                  name="demo")
    (d / "config").write_text("CONFIG_DEMO=y\n")
    s = load_series("demo", patches_dir=pdir)
    assert s.name == "demo" and s.kind == "quilt" and len(s.patches) == 1
    assert s.config_fragment == d / "config"
    assert load_series(None).kind == "none"
    with pytest.raises(BuildError, match="series not found: nosuch"):
        load_series("nosuch", patches_dir=pdir)


def test_quilt_patches_subfolder_layout(tmp_path: Path) -> None:
    d = tmp_path / "q"
    (d / "patches").mkdir(parents=True)
    (d / "patches" / "a.diff").write_bytes(b"--- a/x\n+++ b/x\n@@ -1 +1 @@\n-a\n+b\n")
    (d / "patches" / "series").write_text("a.diff\n")
    assert [p.name for p in load_quilt_series(d).patches] == ["a.diff"]


def test_parse_hunks_git_and_plain_diffs() -> None:
    text = (b"diff --git a/mm/mmap.c b/mm/mmap.c\n--- a/mm/mmap.c\n+++ b/mm/mmap.c\n"
            b"@@ -10,3 +10,4 @@ int f(void)\n x\n+y\n@@ -30,2 +31,2 @@\n-a\n+b\n"
            b"--- mm/other.c\t2020-01-01\n+++ mm/other.c\t2020-01-02\n@@ -1 +1 @@\n-q\n+r\n")
    hunks = parse_hunks(text)
    assert [(h.file, h.old_start) for h in hunks] == [("mm/mmap.c", 10), ("mm/mmap.c", 30),
                                                      ("other.c", 1)]
    assert hunks[0].header == "@@ -10,3 +10,4 @@ int f(void)"
    assert parse_hunks(text, strip=0)[2].file == "mm/other.c"


# --------------------------------------------------------------------------- applying


def test_series_applies_and_tree_moves(tmp_path: Path) -> None:
    repo, base = toy_repo(tmp_path)
    p1 = make_diff(repo, "mm/mmap.c", (repo / "mm/mmap.c").read_text().replace("line 5\n",
                                                                                "line five\n"))
    p2 = make_diff(repo, "mm/rpal.c", "int rpal;\n")
    d = quilt_dir(tmp_path, {"0001-a.patch": p1, "0002-b.patch": p2},
                  "0001-a.patch\n0002-b.patch\n")
    head = apply_series(repo, base, load_quilt_series(d))
    assert "line five" in (repo / "mm/mmap.c").read_text()
    assert (repo / "mm/rpal.c").is_file()
    assert status(repo) == ""
    assert git(repo, "rev-list", "--count", f"{base}..{head}").strip() == "2"
    # going back to the base (no series) removes the added file
    apply_series(repo, base, load_series(None))
    assert not (repo / "mm/rpal.c").exists()


def test_only_changed_files_are_rewritten(tmp_path: Path) -> None:
    """Switching series rewrites only files whose content differs (incremental make)."""
    repo, base = toy_repo(tmp_path)
    (repo / "other.c").write_text("x\n")
    git(repo, "add", "other.c")
    git(repo, "commit", "-q", "-m", "more")
    base = git(repo, "rev-parse", "HEAD").strip()
    mm = (repo / "mm/mmap.c").read_text()
    v1 = make_diff(repo, "mm/mmap.c", mm.replace("line 5\n", "v1\n"))
    v2 = make_diff(repo, "mm/mmap.c", mm.replace("line 5\n", "v2\n"))
    keep = make_diff(repo, "other.c", "y\n")
    d1 = quilt_dir(tmp_path, {"k.patch": keep, "m.patch": v1}, "k.patch\nm.patch\n", name="s1")
    d2 = quilt_dir(tmp_path, {"k.patch": keep, "m.patch": v2}, "k.patch\nm.patch\n", name="s2")
    apply_series(repo, base, load_quilt_series(d1))
    before = (repo / "other.c").stat().st_mtime_ns
    ino = (repo / "other.c").stat().st_ino
    apply_series(repo, base, load_quilt_series(d2))
    assert "v2" in (repo / "mm/mmap.c").read_text()
    assert (repo / "other.c").stat().st_mtime_ns == before
    assert (repo / "other.c").stat().st_ino == ino


def test_patch_that_does_not_apply_names_patch_and_hunk_and_leaves_tree_clean(
    tmp_path: Path,
) -> None:
    repo, base = toy_repo(tmp_path)
    good = make_diff(repo, "mm/rpal.c", "int rpal;\n")
    mm = (repo / "mm/mmap.c").read_text()
    bad = make_diff(repo, "mm/mmap.c", mm.replace("line 5\n", "five\n").replace("line 30\n",
                                                                                "thirty\n"))
    # make the second hunk stale: the base no longer has "line 30" around it
    bad = bad.replace(b"-line 30\n", b"-line 300\n")
    hunk_header = [ln for ln in bad.decode().splitlines() if ln.startswith("@@")][1]
    d = quilt_dir(tmp_path, {"0001-good.patch": good, "0002-bad.patch": bad},
                  "0001-good.patch\n0002-bad.patch\n", name="broken")
    head_before = git(repo, "rev-parse", "HEAD").strip()
    with pytest.raises(BuildError) as exc:
        apply_series(repo, base, load_quilt_series(d))
    msg = exc.value.one_line()
    assert "\n" not in msg
    assert msg.startswith("patch does not apply: broken: 0002-bad.patch (#2)")
    assert f"mm/mmap.c: {hunk_header}" in msg
    assert status(repo) == ""
    assert git(repo, "rev-parse", "HEAD").strip() == head_before
    assert not (repo / "mm/rpal.c").exists()


def test_patch_on_missing_file(tmp_path: Path) -> None:
    repo, base = toy_repo(tmp_path)
    text = (b"diff --git a/kernel/rpal.c b/kernel/rpal.c\n--- a/kernel/rpal.c\n"
            b"+++ b/kernel/rpal.c\n@@ -1,1 +1,1 @@\n-a\n+b\n")
    d = quilt_dir(tmp_path, {"x.patch": text}, "x.patch\n")
    with pytest.raises(BuildError, match=r"x.patch \(#1\): first rejected hunk kernel/rpal.c: "
                                         r"@@ -1,1 \+1,1 @@"):
        apply_series(repo, base, load_quilt_series(d))
    assert status(repo) == ""


def test_reverse_option_and_strip_level(tmp_path: Path) -> None:
    repo, base = toy_repo(tmp_path)
    mm = (repo / "mm/mmap.c").read_text()
    fwd = make_diff(repo, "mm/mmap.c", mm.replace("line 7\n", "seven\n"))
    (repo / "mm/mmap.c").write_text(mm.replace("line 7\n", "seven\n"))
    git(repo, "commit", "-q", "-am", "seven")
    base2 = git(repo, "rev-parse", "HEAD").strip()
    p0 = fwd.replace(b"a/mm/", b"mm/").replace(b"b/mm/", b"mm/")
    d = quilt_dir(tmp_path, {"r.patch": p0}, "r.patch -p0 -R\n")
    apply_series(repo, base2, load_quilt_series(d))
    assert "line 7\n" in (repo / "mm/mmap.c").read_text()
    del base


def test_mbox_series_order_cover_letter_and_failure(tmp_path: Path) -> None:
    repo, base = toy_repo(tmp_path)
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(repo), str(work))
    for i, (path, text) in enumerate([("mm/a.c", "a\n"), ("mm/b.c", "b\n")], 1):
        (work / path).write_text(text)
        git(work, "add", path)
        git(work, "commit", "-q", "-m", f"mm: add file {i}\n\nBody {i}.")
    mbox = tmp_path / "rpal.mbox"
    mbox.write_bytes(subprocess.run(
        ["git", "format-patch", "-q", "--stdout", "--cover-letter", "-2",
         "--subject-prefix=RFC PATCH v2"], cwd=work, check=True, capture_output=True,
        env={"GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin",
             "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}).stdout)
    s = load_series(mbox)
    assert s.kind == "mbox"
    assert [p.subject for p in s.patches] == ["mm: add file 1", "mm: add file 2"]
    head = apply_series(repo, base, s)
    assert (repo / "mm/b.c").read_text() == "b\n"
    assert "mm: add file 2" in git(repo, "log", "-1", "--format=%s", head)
    # the same mbox applied where the files already exist fails on patch 1, cleanly
    apply_series(repo, head, load_series(None))
    with pytest.raises(BuildError, match=r"0001-mm-add-file-1 \(#1\).*mm/a.c.*already exists"):
        apply_series(repo, head, s)
    assert status(repo) == ""


def test_mbox_without_patches(tmp_path: Path) -> None:
    m = tmp_path / "x.mbox"
    m.write_text("From nobody Mon Sep 17 00:00:00 2001\nSubject: hello\n\nno diff here\n")
    with pytest.raises(BuildError, match="contains no patches"):
        load_mbox(m)


def test_describe_failure_fallbacks() -> None:
    p = Patch(name="p", text=b"--- a/f\n+++ b/f\n@@ -3,2 +3,2 @@ ctx\n-a\n+b\n")
    assert describe_failure(p, "error: patch failed: f:3\nerror: f: patch does not apply\n") \
        == "f: @@ -3,2 +3,2 @@ ctx"
    assert describe_failure(p, "error: corrupt patch at line 4\n") == "corrupt patch at line 4"


# --------------------------------------------------------------------------- config


def test_parse_config_and_inline_fragments(tmp_path: Path) -> None:
    text = 'CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C="x y"\nCONFIG_D=0x10\n# comment\n'
    assert kconfig.parse_config(text) == {"CONFIG_A": "y", "CONFIG_B": "n",
                                          "CONFIG_C": '"x y"', "CONFIG_D": "0x10"}
    f = kconfig.load_fragment("CONFIG_RPAL=n")
    assert f.text == "# CONFIG_RPAL is not set\n"
    bad = tmp_path / "bad.config"
    bad.write_text("CONFIG_A=y\nrandom words\n")
    with pytest.raises(BuildError, match=r"malformed config fragment .*bad.config:2"):
        kconfig.load_fragment(bad)
    with pytest.raises(BuildError, match="config fragment not found"):
        kconfig.load_fragment(tmp_path / "nope.config")


def test_base_fragment_is_valid_and_has_the_essentials() -> None:
    opts = kconfig.load_fragment(kconfig.BASE_FRAGMENT).options()
    for sym in ("64BIT", "SMP", "SERIAL_8250_CONSOLE", "BLK_DEV_INITRD", "ACPI",
                "X86_INTEL_MEMORY_PROTECTION_KEYS", "X86_5LEVEL", "PAGE_TABLE_ISOLATION",
                "DEBUG_INFO_BTF", "DEBUG_INFO_DWARF5", "VIRTIO_PCI", "VIRTIO_VSOCKETS",
                "PVPANIC_PCI", "FW_CFG_SYSFS", "CRASH_CORE", "UNIX98_PTYS", "DEVTMPFS_MOUNT"):
        assert opts[f"CONFIG_{sym}"] == "y", sym
    assert opts["CONFIG_RANDOMIZE_BASE"] == "n"


def test_later_fragment_wins_and_check_reports_what_did_not_stick() -> None:
    frags = [kconfig.Fragment("base", "CONFIG_A=y\nCONFIG_B=y\nCONFIG_E=y\n"),
             kconfig.Fragment("user", "# CONFIG_B is not set\nCONFIG_C=m\nCONFIG_D=y\n")]
    req = kconfig.requested_options(frags)
    assert req["CONFIG_B"] == ("n", "user")
    final = kconfig.parse_config("CONFIG_A=y\nCONFIG_C=y\nCONFIG_E=y\n")
    mism = kconfig.check_config(req, final)
    assert [(m.symbol, m.requested, m.actual, m.fragment) for m in mism] == [
        ("CONFIG_C", "m", "y", "user"), ("CONFIG_D", "y", "n", "user")]


def test_parse_merge_config_output() -> None:
    out = """Using .config as base
Merging base.config
Value of CONFIG_64BIT is redefined by fragment base.config:
Previous  value: # CONFIG_64BIT is not set
New value:       CONFIG_64BIT=y

#
# configuration written to .config
#
Value requested for CONFIG_KVM_AMD not in final .config
Requested value:  CONFIG_KVM_AMD=y
Actual value:

Value requested for CONFIG_FOO not in final .config
Requested value:  CONFIG_FOO=y
Actual value:     # CONFIG_FOO is not set
"""
    assert kconfig.parse_merge_config_output(out) == [
        ("CONFIG_KVM_AMD", "CONFIG_KVM_AMD=y", ""),
        ("CONFIG_FOO", "CONFIG_FOO=y", "# CONFIG_FOO is not set"),
    ]


def synthetic_kconfig(root: Path) -> Path:
    (root / "arch" / "x86").mkdir(parents=True)
    (root / "arch" / "arm").mkdir(parents=True)
    (root / "virt").mkdir()
    (root / "Kconfig").write_text('mainmenu "toy"\nsource "arch/$(SRCARCH)/Kconfig"\n'
                                  'source "virt/Kconfig"\n')
    (root / "arch" / "x86" / "Kconfig").write_text(
        'config X86_64\n\tdef_bool y\n\nconfig CPU_SUP_AMD\n\tbool "AMD"\n\thelp\n'
        '\t  config FAKE in help text\n\t  depends on NOTHING\n\n'
        'config PKU\n\tbool "pkeys"\n\tdepends on X86_64 && (CPU_SUP_INTEL || CPU_SUP_AMD)\n'
        '\tselect ARCH_HAS_PKEYS\n\nconfig ARCH_HAS_PKEYS\n\tbool\n')
    (root / "arch" / "arm" / "Kconfig").write_text('config KVM_AMD\n\tbool "not this one"\n')
    (root / "virt" / "Kconfig").write_text(
        'menuconfig VIRTUALIZATION\n\tbool "virt"\n\nif VIRTUALIZATION\n'
        'menu "KVM"\n\tdepends on HAVE_KVM\n\nconfig KVM\n\ttristate "kvm"\n\n'
        'config KVM_AMD\n\ttristate "kvm amd"\n\tdepends on KVM && \\\n\t\tCPU_SUP_AMD\n'
        'endmenu\nendif\n\nconfig OUTSIDE\n\tbool "o"\n')
    return root


def test_kconfig_index_explains_unmet_dependencies(tmp_path: Path) -> None:
    root = synthetic_kconfig(tmp_path / "src")
    idx = kconfig.KconfigIndex.load(root)
    assert "FAKE" not in idx.defs  # help text is not parsed as a definition
    kvm_amd = idx.defs["KVM_AMD"]
    assert len(kvm_amd) == 1  # arch/arm is not read for x86
    assert kvm_amd[0].depends == ["VIRTUALIZATION", "HAVE_KVM", "KVM && CPU_SUP_AMD"]
    assert idx.defs["OUTSIDE"][0].depends == []
    final = kconfig.parse_config("CONFIG_X86_64=y\nCONFIG_VIRTUALIZATION=y\n")
    why = idx.explain("CONFIG_KVM_AMD", "y", final)
    assert why == "unmet dependency HAVE_KVM && KVM && CPU_SUP_AMD (virt/Kconfig)"
    why = idx.explain("CONFIG_PKU", "y", final)
    assert why == "unmet dependency X86_64 && (CPU_SUP_INTEL || CPU_SUP_AMD) (arch/x86/Kconfig)"
    assert idx.explain("CONFIG_NOPE", "y", final) == "no such option in this tree's Kconfig"
    final2 = {**final, "CONFIG_CPU_SUP_AMD": "y", "CONFIG_PKU": "y", "CONFIG_ARCH_HAS_PKEYS": "y"}
    assert idx.explain("CONFIG_ARCH_HAS_PKEYS", "n", final2) == "selected by PKU"
    assert idx.explain("CONFIG_ARCH_HAS_PKEYS", "y", final).startswith(
        "has no prompt, it can only be selected; selected by PKU")


def test_explain_mismatches_one_line_each(tmp_path: Path) -> None:
    root = synthetic_kconfig(tmp_path / "src")
    final = kconfig.parse_config("CONFIG_X86_64=y\n")
    mism = kconfig.check_config({"CONFIG_PKU": ("y", "/x/base.config")}, final)
    (line,) = kconfig.explain_mismatches(mism, root, final)
    assert line == ("CONFIG_PKU=y (from base.config), final value n: unmet "
                    "dependency X86_64 && (CPU_SUP_INTEL || CPU_SUP_AMD) (arch/x86/Kconfig)")
    mism = kconfig.check_config({"CONFIG_PKU": ("y", "CONFIG_PKU=y")}, final)
    assert kconfig.explain_mismatches(mism, root, final)[0].startswith(
        "CONFIG_PKU=y (from inline), final value n")


def test_unknown_options_skipped_only_for_tolerant_fragments(tmp_path: Path) -> None:
    idx = kconfig.KconfigIndex.load(synthetic_kconfig(tmp_path / "src"))
    mism = [kconfig.Mismatch("CONFIG_MITIGATION_PAGE_TABLE_ISOLATION", "y", "n", "/k/base.config"),
            kconfig.Mismatch("CONFIG_PKU", "y", "n", "/k/base.config"),
            kconfig.Mismatch("CONFIG_TYPO", "y", "n", "user.config")]
    kept, skipped = kconfig.split_unknown(mism, idx, ["/k/base.config"])
    assert [m.symbol for m in skipped] == ["CONFIG_MITIGATION_PAGE_TABLE_ISOLATION"]
    assert [m.symbol for m in kept] == ["CONFIG_PKU", "CONFIG_TYPO"]


@pytest.mark.parametrize(
    ("expr", "value"),
    [("A", 2), ("!A", 0), ("A && B", 0), ("A || B", 2), ("M", 1), ("A && M", 1),
     ("!(A && B)", 2), ('S = "x"', 2), ('S != "x"', 0), ("N >= 5", 2), ("N < 5", 0),
     ("A=y", 2), ("B=n", 2), ("64BIT", 2)],
)
def test_expression_evaluation(expr: str, value: int) -> None:
    cfg = {"CONFIG_A": "y", "CONFIG_M": "m", "CONFIG_S": '"x"', "CONFIG_N": "8",
           "CONFIG_64BIT": "y"}
    assert kconfig.evaluate(expr, cfg) == value


# --------------------------------------------------------------------------- cache


def tiny_tarball(path: Path, version: str = "6.1.999") -> Path:
    """A tarball holding a 'kernel tree' (just enough for identity and import)."""
    maj, mid, sub = version.split(".")
    files = {
        "linux-toy/Makefile": f"VERSION = {maj}\nPATCHLEVEL = {mid}\nSUBLEVEL = {sub}\n"
                              "EXTRAVERSION =\nkernelversion:\n\t@echo "
                              f"{version}\n",
        "linux-toy/Kconfig": 'mainmenu "toy"\n',
        "linux-toy/mm/mmap.c": "".join(f"line {i}\n" for i in range(1, 41)),
    }
    with tarfile.open(path, "w:gz") as tf:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tf.addfile(info, io.BytesIO(data))
    return path


def test_cache_key_stable_and_sensitive(tmp_path: Path) -> None:
    repo, _ = toy_repo(tmp_path)
    p = make_diff(repo, "mm/rpal.c", "int rpal;\n")
    d = quilt_dir(tmp_path, {"a.patch": p}, "a.patch\n")
    frags = [kconfig.Fragment("base", "CONFIG_A=y\n")]
    tc = {"cc": "gcc 12", "ld": "ld 2.40", "pahole": "v1.24", "make": "4.3"}
    k1 = kernel.cache_key("debian:x", load_quilt_series(d), frags, tc)
    k2 = kernel.cache_key("debian:x", load_quilt_series(d), list(frags), dict(tc))
    assert k1 == k2 and len(k1) == 24
    # one byte of one patch, a fragment, the base, the toolchain, the options: all change it
    (d / "a.patch").write_bytes(p.replace(b"int rpal;", b"int rpal2;"))
    assert kernel.cache_key("debian:x", load_quilt_series(d), frags, tc) != k1
    (d / "a.patch").write_bytes(p)
    assert kernel.cache_key("debian:x", load_quilt_series(d), frags, tc) == k1
    assert kernel.cache_key("debian:y", load_quilt_series(d), frags, tc) != k1
    frags2 = [kconfig.Fragment("base", "CONFIG_A=y\nCONFIG_B=y\n")]
    assert kernel.cache_key("debian:x", load_quilt_series(d), frags2, tc) != k1
    assert kernel.cache_key("debian:x", load_quilt_series(d), frags, {**tc, "cc": "gcc 13"}) != k1
    (d / "series").write_text("a.patch -p1 -R\n")
    assert kernel.cache_key("debian:x", load_quilt_series(d), frags, tc) != k1
    # the fragment's file name does not matter, only its content
    frags3 = [kconfig.Fragment("elsewhere/base", "CONFIG_A=y\n")]
    (d / "series").write_text("a.patch\n")
    assert kernel.cache_key("debian:x", load_quilt_series(d), frags3, tc) == k1


def test_tarball_identity_and_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tb = tiny_tarball(tmp_path / "linux-toy.tar.gz")
    memo = tmp_path / "memo"
    a = resolve_source(tb, memo)
    b = resolve_source(tb, memo)
    assert a.identity == b.identity and a.kind == "tarball"
    assert json.loads((memo / "file-hashes.json").read_text())
    repo = tmp_path / "work" / "src"
    repo.parent.mkdir()
    log = tmp_path / "log"
    commit = prepare_repo(a, repo, log)
    assert (repo / "mm" / "mmap.c").is_file()  # top folder stripped
    assert prepare_repo(a, repo, log) == commit  # second time: remembered
    assert status(repo) == ""
    with pytest.raises(BuildError, match="kernel source not found"):
        resolve_source(tmp_path / "nope", memo)
    del monkeypatch


def test_git_tree_source_identity_includes_local_changes(tmp_path: Path) -> None:
    repo, base = toy_repo(tmp_path)
    memo = tmp_path / "memo"
    clean = resolve_source(repo, memo)
    assert clean.kind == "git" and clean.identity == f"git:{base}"
    (repo / "mm" / "mmap.c").write_text("changed\n")
    dirty = resolve_source(repo, memo)
    assert dirty.identity.startswith(f"git:{base}:dirty:")
    work = tmp_path / "work" / "src"
    work.parent.mkdir()
    commit = prepare_repo(dirty, work, tmp_path / "log")
    git(work, "reset", "-q", "--hard", commit)
    assert (work / "mm" / "mmap.c").read_text() == "changed\n"
    assert git(repo, "status", "--porcelain").strip() == "M mm/mmap.c"  # user's tree untouched


def test_second_build_of_same_inputs_is_a_cache_hit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_kernel returns a complete cache entry without touching any tree or make."""
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    tb = tiny_tarball(tmp_path / "linux-toy.tar.gz")
    base = resolve_source(tb, kernel.work_dir())
    frags = [kconfig.load_fragment(kconfig.BASE_FRAGMENT), kconfig.load_fragment("CONFIG_X=y")]
    key = kernel.cache_key(base.identity, load_series(None), frags, kernel.toolchain_versions())
    d = kernel.kernels_dir() / key
    d.mkdir(parents=True)
    for name in kernel.ARTIFACTS:
        (d / name).write_text("x")
    (d / "meta.json").write_text(json.dumps({
        "key": key, "base_version": "toy 6.1.999", "kernel_release": "6.1.999",
        "series": {"name": ""}, "created": "2026-11-26T10:00:00+0000",
        "fragments": ["base.config", "CONFIG_X=y"]}))
    monkeypatch.setattr(kernel, "_build_locked", lambda *a, **k: pytest.fail("rebuilt"))
    kb = kernel.build_kernel(config_fragments=["CONFIG_X=y"], source=tb)
    assert kb.cached and kb.key == key and kb.bzimage == d / "bzImage"
    # how fast a hit is: bench/offline_time.py
    rows = kernel.list_cached()
    assert [(r["key"], r["series"], r["base_version"]) for r in rows] == [
        (key, "-", "toy 6.1.999")]
    assert kernel.load_build(key[:8]).dir == d
    with pytest.raises(BuildError, match="no cached kernel build"):
        kernel.load_build("ffffffff")


def test_missing_source_is_one_line_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BuildError, match="kernel source not found"):
        kernel.build_kernel(source=tmp_path / "none")
    notkernel = tmp_path / "dir"
    notkernel.mkdir()
    with pytest.raises(BuildError, match="is not a kernel tree"):
        kernel.build_kernel(source=notkernel)
    monkeypatch.setattr("testbed.build.kernel_source.DEBIAN_TARBALL", tmp_path / "absent.tar.xz")
    with pytest.raises(BuildError, match=r"base kernel source missing: .*linux-source-6.1"):
        kernel.build_kernel()


def test_first_error_picks_the_compiler_error() -> None:
    lines = ["  CC      mm/mmap.o",
             "mm/mmap.c: In function 'f':",
             "mm/mmap.c:12:5: warning: unused variable 'x'",
             "mm/mmap.c:13:9: error: 'y' undeclared (first use in this function)",
             "make[2]: *** [scripts/Makefile.build:250: mm/mmap.o] Error 1",
             "make: *** [Makefile:2012: .] Error 2"]
    assert kernel.first_error(lines) == (
        "mm/mmap.c:13:9: error: 'y' undeclared (first use in this function)")
    assert kernel.first_error(lines[-2:]).startswith("make[2]: ***")
    assert kernel.first_error(["ld: vmlinux.o: in function `f':",
                               "x.c:(.text+0x1): undefined reference to `g'"]).endswith("`g'")


def test_cli_parser() -> None:
    parser = argparse.ArgumentParser(prog="testbed")
    kernel_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    a = parser.parse_args(["kernel", "build", "--series", "rpal-ref", "--config", "a.config",
                           "--config", "CONFIG_B=y", "CONFIG_C=n", "--source", "/t", "-j", "2"])
    assert (a.series, a.config, a.source, a.jobs) == (
        "rpal-ref", ["a.config", "CONFIG_B=y", "CONFIG_C=n"], "/t", 2)
    assert parser.parse_args(["kernel", "list"]).func is not None


def test_cli_list_prints_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TESTBED_CACHE", str(tmp_path / "cache"))
    parser = argparse.ArgumentParser(prog="testbed")
    kernel_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["kernel", "list"])
    assert args.func(args) == 0
    assert "no cached kernel builds" in capsys.readouterr().out


# --------------------------------------------------------------------------- build trees


def fake_tree(origin: Path, name: str, *, complete: bool, age: int) -> Path:
    d = origin / name
    (d / "tools" / "objtool").mkdir(parents=True)
    if complete:
        (d / "vmlinux").write_text("elf")
    (d / ".config").write_text(f"CONFIG_{name.replace('-', '_').upper()}=y\n")
    rec = d / "tools" / "objtool" / ".weak.o.cmd"
    rec.write_text(f"cmd_{d}/tools/objtool/weak.o := gcc -o {d}/tools/objtool/weak.o\n")
    os.utime(rec, ns=(10**18, 10**18))
    t = 1_700_000_000 + age
    os.utime(d, (t, t))
    return d


def test_prune_keeps_recent_complete_trees(tmp_path: Path) -> None:
    cur = fake_tree(tmp_path, "obj-cur", complete=False, age=50)
    old = [fake_tree(tmp_path, f"obj-{i}", complete=True, age=i) for i in range(4)]
    fake_tree(tmp_path, "obj-failed", complete=False, age=40)
    fake_tree(tmp_path, "obj-x.seeding", complete=True, age=45)
    kernel._prune_build_trees(tmp_path, keep=3, current=cur)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj-2", "obj-3", "obj-cur"]
    assert old[3].is_dir()


def test_seed_copies_newest_tree_keeps_new_config_and_relocates_tools(tmp_path: Path) -> None:
    fake_tree(tmp_path, "obj-old", complete=True, age=1)
    donor = fake_tree(tmp_path, "obj-new", complete=True, age=2)
    obj = tmp_path / "obj-target"
    obj.mkdir()
    (obj / ".config").write_text("CONFIG_TARGET=y\n")
    log = tmp_path / "log"
    name = kernel._seed_build_tree(tmp_path, obj, log, Progress("t"))
    assert name == "obj-new"
    assert (obj / "vmlinux").is_file()
    assert (obj / ".config").read_text() == "CONFIG_TARGET=y\n"
    rec = obj / "tools" / "objtool" / ".weak.o.cmd"
    assert str(obj) in rec.read_text() and str(donor) not in rec.read_text()
    assert rec.stat().st_mtime_ns == 10**18
    assert not list(tmp_path.glob("*.seeding"))
    assert kernel._seed_build_tree(tmp_path / "none", tmp_path / "none" / "obj-x", log,
                                   Progress("t")) == ""


# ---------------------------------------------------------------- cache: remove and prune


def _fake_build(cache: Path, key: str, series: str, created: str) -> Path:
    d = cache / "kernels" / key
    d.mkdir(parents=True)
    for name in kernel.ARTIFACTS:
        (d / name).write_text("x")
    meta = {"key": key, "created": created, "series": {"name": series}, "base_version": "b"}
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def test_prune_keeps_the_newest_of_each_series(tmp_path: Path) -> None:
    rows = [{"key": k, "series": s, "date": d, "size": 1} for k, s, d in [
        ("a1", "rpal-ref", "2026-01-01"), ("a2", "rpal-ref", "2026-01-03"),
        ("a3", "rpal-ref", "2026-01-02"), ("b1", "-", "2026-01-01"), ("c1", "other", "2026-01-05"),
    ]]
    assert [r["key"] for r in kernel.prune_plan(rows, 2)] == ["a1"]
    assert [r["key"] for r in kernel.prune_plan(rows, 1)] == ["a1", "a3"]
    assert [r["key"] for r in kernel.prune_plan(rows, 0)] == ["a1", "b1", "a3", "a2", "c1"]


def test_kernel_remove_and_prune_commands(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    old = _fake_build(cache, "aaaa1111", "rpal-ref", "2026-01-01T00:00:00")
    new = _fake_build(cache, "bbbb2222", "rpal-ref", "2026-01-02T00:00:00")
    other = _fake_build(cache, "cccc3333", "-", "2026-01-01T00:00:00")
    env = {"TESTBED_CACHE": str(cache)}
    dry = run_testbed("kernel", "prune", "--keep", "1", "--dry-run", env=env)
    assert dry.returncode == 0 and "would remove aaaa1111" in dry.stdout and old.exists()
    res = run_testbed("kernel", "prune", "--keep", "1", env=env)
    assert res.returncode == 0, res.stderr
    assert not old.exists() and new.exists() and other.exists()
    res = run_testbed("kernel", "remove", "cccc", env=env)
    assert res.returncode == 0 and not other.exists()
    res = run_testbed("kernel", "remove", "nosuchkey", env=env)
    assert res.returncode == 125 and len(res.stderr.strip().splitlines()) == 1
    assert "no cached kernel build nosuchkey" in res.stderr
