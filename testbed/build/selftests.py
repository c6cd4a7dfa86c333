"""Build a kernel selftest from the base tree: today the x86 `protection_keys` test.

The sources come from Debian's linux-source tarball (the same base as the
kernel builds), another tarball, or a kernel tree on disk. Only the files the
test needs are unpacked (`tar --wildcards`), and the test is built as one
static x86-64 binary with the flags of its own Makefile (`-m64 -mxsave`,
`-lrt -ldl -lpthread`, `-no-pie`) plus `-static -O2`.

One addition to the test as written: a separate C file linked in whose
constructor makes stdout line-buffered. Over SSH stdout is a pipe, so the test's printf output
would otherwise sit in a 4 KiB buffer that a crash loses and that fork()
copies into its children (which flush it again at exit): the log would lie.

The binary and a `meta.json` (the test-case names read from the source, the
iteration count, where the source came from) are cached by a hash of the
source identity, the compiler and the flags under
`cache_dir()/selftests/<key>/`, as guest programs are.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from testbed import paths
from testbed.errors import BuildError

CC = os.environ.get("TESTBED_CC", "gcc")
# selftests/vm became selftests/mm in v6.3; both are tried.
SELFTEST_DIRS = ("tools/testing/selftests/vm", "tools/testing/selftests/mm")
COMMON_FILES = ("tools/testing/selftests/kselftest.h",)
LINEBUF_SOURCE = (
    "/* added by testbed: line-buffered stdout, so a crash or a fork loses or doubles nothing */\n"
    "#include <stdio.h>\n"
    "__attribute__((constructor)) static void testbed_linebuf(void)\n"
    "{ setvbuf(stdout, NULL, _IOLBF, 0); }\n"
)


@dataclass(frozen=True)
class Suite:
    name: str
    main: str  # the C file with main(), in the selftest folder
    patterns: tuple[str, ...]  # file names (globs) of the selftest folder it needs
    cflags: tuple[str, ...]
    ldlibs: tuple[str, ...]
    extra_c: tuple[str, ...] = ()  # further C files linked in when the tree has them


SUITES: dict[str, Suite] = {
    "protection_keys": Suite(
        name="protection_keys",
        main="protection_keys.c",
        # pkey-*.h: the arch helpers; vm_util.*, pkey_util.c: what later trees split out
        patterns=("protection_keys.c", "pkey-*.h", "pkey_util.c", "vm_util.[ch]"),
        # tools/testing/selftests/vm/Makefile: CFLAGS = -Wall -I $(top_srcdir) ...,
        # -no-pie, and for the 64-bit binaries -m64 -mxsave, LDLIBS -lrt -lpthread -lrt -ldl
        cflags=("-Wall", "-no-pie", "-m64", "-mxsave", "-static", "-O2"),
        ldlibs=("-lrt", "-ldl", "-lpthread"),
        extra_c=("pkey_util.c",),
    ),
}


@dataclass(frozen=True)
class Selftest:
    """A built selftest binary and what the runner needs to know about it."""

    suite: str
    binary: Path
    key: str
    source: str  # where the sources came from (label)
    tests: tuple[str, ...] = ()  # test-case names in run order, when the source lists them
    iterations: int = 0  # how many times each test case runs (0: unknown)
    meta: dict[str, object] = field(default_factory=dict, compare=False)


def _compiler_id() -> str:
    try:
        return subprocess.run([CC, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"C compiler {CC!r} not usable ({exc}); run `testbed setup`") from exc


def selftests_dir() -> Path:
    path = paths.cache_dir() / "selftests"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- source files


def _tree_files(tree: Path, suite: Suite) -> tuple[str, dict[str, bytes]]:
    """The suite's files from a kernel tree on disk: {path relative to the tree: bytes}."""
    for d in SELFTEST_DIRS:
        if (tree / d / suite.main).is_file():
            files: dict[str, bytes] = {}
            for pat in suite.patterns:
                for f in sorted((tree / d).glob(pat)):
                    files[f"{d}/{f.name}"] = f.read_bytes()
            for c in COMMON_FILES:
                if (tree / c).is_file():
                    files[c] = (tree / c).read_bytes()
            return d, files
    wanted = " or ".join(f"{d}/{suite.main}" for d in SELFTEST_DIRS)
    raise BuildError(f"kernel tree {tree} has no {wanted}: not a Linux source tree?")


def _tarball_files(tarball: Path, suite: Suite, dest: Path) -> tuple[str, dict[str, bytes]]:
    """Unpack only the suite's files from `tarball` into `dest`; read them back."""
    patterns = [f"*{d}/{p}" for d in SELFTEST_DIRS for p in suite.patterns]
    patterns += [f"*{c}" for c in COMMON_FILES]
    # Exit status 2 with "Not found in archive" is expected: each tree has only one of vm/, mm/.
    proc = subprocess.run(
        ["tar", "-xf", str(tarball), "-C", str(dest), "--wildcards", "--no-anchored", *patterns],
        capture_output=True, text=True, check=False,
    )
    mains = sorted(dest.rglob(suite.main))
    if not mains:
        detail = next((ln for ln in proc.stderr.splitlines() if "Not found" not in ln), "")
        msg = f"{tarball} has no {suite.main} under {' or '.join(SELFTEST_DIRS)}"
        raise BuildError(msg + (f" (tar: {detail})" if detail else ""))
    sel = mains[0].parent
    tree = sel
    for _ in range(3):  # selftests/vm -> tools/testing/selftests -> tools -> tree
        tree = tree.parent
    tree = tree.parent
    rel = str(sel.relative_to(tree))
    return rel, _tree_files(tree, suite)[1]


# --------------------------------------------------------------------------- source metadata


def test_names(source: str) -> tuple[str, ...]:
    """The test cases of protection_keys.c in run order (its `pkey_tests[]` table). Pure.

    Entries under a preprocessor condition are kept only for x86 (what we build).
    """
    m = re.search(r"pkey_tests\s*\[\s*\]\s*\)\s*\([^)]*\)\s*=\s*\{(.*?)\};", source, re.S)
    if m is None:
        return ()
    names: list[str] = []
    stack: list[tuple[bool, bool]] = []  # (enclosing branch kept, this condition holds)
    keep = True
    for raw in m.group(1).splitlines():
        line = raw.strip()
        if line.startswith("#if"):
            holds = "__x86_64__" in line or "__i386__" in line or not re.search(r"__\w+__", line)
            stack.append((keep, holds))
            keep = keep and holds
        elif line.startswith("#else") and stack:
            outer, holds = stack[-1]
            keep = outer and not holds
        elif line.startswith("#endif") and stack:
            keep = stack.pop()[0]
        elif keep:
            names += re.findall(r"\b([A-Za-z_]\w*)\b", re.sub(r"/\*.*?\*/|//.*", "", line))
    return tuple(names)


def iteration_count(source: str) -> int:
    """How many times main() runs every test (`int nr_iterations = 22;`), 0 if not found."""
    m = re.search(r"nr_iterations\s*=\s*(\d+)\s*;", source)
    return int(m.group(1)) if m else 0


# --------------------------------------------------------------------------- build


def _identity(source: str | os.PathLike[str] | None) -> tuple[str, str, Path | None, Path | None]:
    """(identity, label, tarball, tree) of the base source, without unpacking a tarball."""
    from testbed.build.kernel_source import resolve_source

    if source is not None and Path(source).is_dir():
        tree = Path(source).resolve()
        return "", f"tree {tree}", None, tree
    base = resolve_source(source, selftests_dir())
    return base.identity, base.label or str(base.path), base.path, None


def cache_key(suite: Suite, identity: str) -> str:
    h = hashlib.sha256()
    h.update(_compiler_id().encode())
    h.update(json.dumps([suite.name, suite.main, suite.patterns, suite.cflags, suite.ldlibs,
                         suite.extra_c, LINEBUF_SOURCE]).encode())
    h.update(identity.encode())
    return h.hexdigest()[:20]


def _files_identity(files: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return "files:sha256:" + h.hexdigest()


def _load(out: Path, suite: Suite) -> Selftest | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    binary = out / suite.name
    if not binary.is_file():
        return None
    return Selftest(suite.name, binary, out.name, str(meta.get("source", "")),
                    tuple(meta.get("tests", ())), int(meta.get("iterations", 0)), meta)


def build_selftest(suite: str = "protection_keys",
                   source: str | os.PathLike[str] | None = None) -> Selftest:
    """Build (or take from the cache) the selftest `suite` from `source`.

    `source`: None for Debian's linux-source tarball, a tarball, or a kernel tree
    (a folder; its files are read in place, never written).
    """
    if suite not in SUITES:
        raise BuildError(f"unknown selftest suite {suite!r}: known are {', '.join(SUITES)}")
    s = SUITES[suite]
    identity, label, tarball, tree = _identity(source)
    files: dict[str, bytes] | None = None
    rel = ""
    if tree is not None:  # cheap to read: the key is the content of the files themselves
        rel, files = _tree_files(tree, s)
        identity = _files_identity(files)
    key = cache_key(s, identity)
    out = selftests_dir() / key
    cached = _load(out, s)
    if cached is not None:
        return cached
    with tempfile.TemporaryDirectory(prefix=f"{key}.", dir=selftests_dir()) as tmp_s:
        tmp = Path(tmp_s)
        src = tmp / "src"
        src.mkdir()
        if files is None:
            assert tarball is not None
            unpack = tmp / "unpack"
            unpack.mkdir()
            rel, files = _tarball_files(tarball, s, unpack)
        for name, data in files.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(data)
        (src / "testbed-linebuf.c").write_text(LINEBUF_SOURCE)
        seldir = src / rel
        binary = tmp / "bin" / s.name
        binary.parent.mkdir()
        cfiles = [s.main, *(c for c in s.extra_c if (seldir / c).is_file())]
        cmd = [CC, *s.cflags, "-I", str(src), *cfiles, str(src / "testbed-linebuf.c"),
               *s.ldlibs, "-o", str(binary)]
        res = subprocess.run(cmd, cwd=seldir, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            first = next((ln for ln in res.stderr.splitlines() if "error" in ln),
                         res.stderr.strip()[:200])
            raise BuildError(f"selftest {s.name} ({label}) does not compile: {first}")
        main_src = files[f"{rel}/{s.main}"].decode(errors="replace")
        meta = {
            "suite": s.name, "source": label, "identity": identity, "dir": rel,
            "tests": list(test_names(main_src)), "iterations": iteration_count(main_src),
            "command": " ".join(cmd).replace(str(src), "<src>")
                       .replace(str(binary.parent), "<out>"),
        }
        (binary.parent / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        try:
            (binary.parent).rename(out)
        except OSError:  # built concurrently by another run: theirs is as good as ours
            pass
    built = _load(out, s)
    if built is None:
        raise BuildError(f"selftest {s.name}: cache entry {out} is incomplete; delete it")
    return built
