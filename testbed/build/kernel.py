"""Build bootable kernels from a base tree, a patch series and config fragments.

``build_kernel()`` is the pipeline:

1. name the base (Debian's linux-source tarball by default, or a user's tarball
   or git tree) and the series, load the config fragments, and hash all of
   them with the toolchain versions into a cache key;
2. when ``cache_dir()/kernels/<key>/`` is complete, return it at once;
3. otherwise, under a lock, keep one git repository per base in
   ``cache_dir()/kernel-work/<origin>/src``: the series is applied into a
   scratch index (the tree is never left half-patched) and the tree is moved
   to the result, rewriting only the files that differ;
4. configure out of tree (``O=``) in an object folder kept per
   (base, fragments, toolchain): ``make tinyconfig``, then merge_config.sh with
   base.config, the series' ``config`` and the user's fragments; check that
   every requested option stuck;
5. ``make bzImage`` with progress on a terminal and the full log in the run
   folder. The object folder survives, so another series on the same base and
   config rebuilds incrementally;
6. copy bzImage, vmlinux, .config, System.map and the log into the cache with a
   meta.json that records the exact base version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed import paths
from testbed.build import kconfig
from testbed.build.kernel_source import BaseSource, kernel_version, prepare_repo, resolve_source
from testbed.build.series import Series, apply_series, load_series
from testbed.errors import BuildError
from testbed.progress import Progress

# Bump when the pipeline changes in a way that changes its output.
PIPELINE_VERSION = 1
ARTIFACTS = ("bzImage", "vmlinux", "config", "System.map", "build.log", "meta.json")
MAKE_ENV = {
    "KBUILD_BUILD_USER": "testbed",
    "KBUILD_BUILD_HOST": "testbed",
    "LOCALVERSION": "",  # set but empty: no "+" suffix for a git-managed tree
    "LC_ALL": "C",
}


@dataclass(frozen=True)
class KernelBuild:
    """A built kernel in the cache."""

    key: str
    dir: Path
    bzimage: Path
    vmlinux: Path
    config: Path
    system_map: Path
    build_log: Path
    base_version: str  # e.g. "linux-source-6.1 6.1.192-2 (make kernelversion 6.1.192)"
    kernel_release: str  # `make kernelrelease`, what uname -r says in the guest
    series: str
    cached: bool = False  # True when this call found it in the cache
    seconds: float = 0.0  # wall time of this call
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def kernels_dir() -> Path:
    path = paths.cache_dir() / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def work_dir() -> Path:
    path = paths.cache_dir() / "kernel-work"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- cache key


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return "missing"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def toolchain_versions() -> dict[str, str]:
    cc = os.environ.get("CC", "gcc")
    return {
        "cc": _first_line([cc, "--version"]),
        "ld": _first_line(["ld", "--version"]),
        "pahole": _first_line(["pahole", "--version"]),
        "make": _first_line(["make", "--version"]),
    }


def cache_key(base_identity: str, series: Series, fragments: Sequence[kconfig.Fragment],
              toolchain: dict[str, str]) -> str:
    """Content hash of everything that decides the output; stable across runs and hosts."""
    doc = {
        "pipeline": PIPELINE_VERSION,
        "base": base_identity,
        "series": series.fingerprint(),
        "fragments": [hashlib.sha256(f.text.encode()).hexdigest() for f in fragments],
        "toolchain": toolchain,
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _config_id(base: BaseSource, fragments: Sequence[kconfig.Fragment],
               toolchain: dict[str, str]) -> str:
    blob = json.dumps([base.origin_id, [f.text for f in fragments], toolchain]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- cache access


def _from_dir(d: Path, *, cached: bool, seconds: float = 0.0) -> KernelBuild:
    meta = json.loads((d / "meta.json").read_text())
    return KernelBuild(
        key=meta["key"], dir=d, bzimage=d / "bzImage", vmlinux=d / "vmlinux",
        config=d / "config", system_map=d / "System.map", build_log=d / "build.log",
        base_version=meta.get("base_version", ""), kernel_release=meta.get("kernel_release", ""),
        series=meta.get("series", {}).get("name", ""), cached=cached, seconds=seconds, meta=meta)


def _complete(d: Path) -> bool:
    return all((d / name).is_file() for name in ARTIFACTS)


def load_build(spec: str | os.PathLike[str]) -> KernelBuild:
    """A cached build by key (or unique key prefix) or by its folder."""
    path = Path(spec)
    if path.is_dir() and _complete(path):
        return _from_dir(path, cached=True)
    matches = [d for d in kernels_dir().glob(f"{spec}*") if d.is_dir() and _complete(d)]
    if len(matches) == 1:
        return _from_dir(matches[0], cached=True)
    if not matches:
        raise BuildError(f"no cached kernel build {spec} (see `testbed kernel list`)")
    raise BuildError(f"kernel build key {spec} is ambiguous ({len(matches)} matches)")


def list_cached() -> list[dict[str, Any]]:
    """What is in the cache: key, base version, series, date, size in bytes."""
    rows = []
    for d in sorted(kernels_dir().iterdir()):
        if not d.is_dir() or not _complete(d):
            continue
        try:
            meta = json.loads((d / "meta.json").read_text())
        except ValueError:
            continue
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        rows.append({
            "key": meta.get("key", d.name),
            "base_version": meta.get("base_version", ""),
            "kernel_release": meta.get("kernel_release", ""),
            "series": meta.get("series", {}).get("name", "") or "-",
            "fragments": [Path(f).name for f in meta.get("fragments", [])],
            "date": meta.get("created", ""),
            "size": size,
            "dir": str(d),
        })
    rows.sort(key=lambda r: r["date"])
    return rows


def prune_plan(rows: list[dict[str, Any]], keep: int) -> list[dict[str, Any]]:
    """Of `list_cached()` rows, those to remove: all but the `keep` newest of each series
    (builds without a series count as one series). Pure."""
    by_series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_series.setdefault(r["series"], []).append(r)
    drop = []
    for group in by_series.values():
        group = sorted(group, key=lambda r: r["date"], reverse=True)
        drop += group[max(0, keep):]
    return sorted(drop, key=lambda r: r["date"])


def remove_build(key: str) -> Path:
    """Delete one cached build (by key or unique prefix); returns the folder removed."""
    build = load_build(key)
    folder = build.bzimage.parent
    if folder.parent != kernels_dir():
        raise BuildError(f"{folder} is not in the kernel cache {kernels_dir()}")
    shutil.rmtree(folder)
    return folder


@contextmanager
def _locked(path: Path, progress: Progress) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.update("waiting for another kernel build to finish", force=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- running make

_COMPILE_STEPS = frozenset({"CC", "AS", "HOSTCC", "CC [M]"})
_TARGET_RE = re.compile(r"^\s{2}([A-Z][A-Z0-9_-]{1,10})\s+(\S+)")
_ERROR_RES = (
    re.compile(r"^\S+:\d+:(\d+:)? (fatal )?error: .*"),
    re.compile(r".*\bundefined reference to .*"),
    re.compile(r"^\S+: error: .*|^error: .*|.*\bERROR: .*"),
    re.compile(r"^make(\[\d+\])?: \*\*\* .*"),
)


def first_error(lines: Sequence[str]) -> str:
    """The line that best names why a build failed (the compiler's first error)."""
    for pattern in _ERROR_RES:
        for line in lines:
            if pattern.match(line.strip()):
                return line.strip()
    tail = [ln.strip() for ln in lines if ln.strip()]
    return tail[-1] if tail else "no output"


def run_logged(cmd: Sequence[str], *, cwd: Path, log: Path, progress: Progress,
               what: str, env: dict[str, str] | None = None) -> list[str]:
    """Run a command, append its output to ``log``, show its progress; raise on failure."""
    full_env = {**os.environ, **MAKE_ENV, **(env or {})}
    lines: list[str] = []
    with log.open("a", encoding="utf-8", errors="replace") as fh:
        fh.write(f"$ (cd {cwd} && {' '.join(cmd)})\n")
        fh.flush()
        proc = subprocess.Popen(list(cmd), cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        objects = 0  # compiled so far (CC/AS lines): what a CI log's heartbeat shows
        for line in proc.stdout:
            fh.write(line)
            lines.append(line.rstrip("\n"))
            m = _TARGET_RE.match(line)
            if m and m.group(1) in _COMPILE_STEPS:
                objects += 1
            detail = f"{m.group(1)} {m.group(2)}" if m else line.strip()[:70]
            done = f"{objects} objects compiled, " if objects else ""
            progress.update(f"{what}: {done}{detail} ({len(lines)} lines)")
        rc = proc.wait()
        fh.write(f"# exit status {rc}\n")
    if rc != 0:
        raise BuildError(f"{what} failed: {first_error(lines)} (log: {log})")
    return lines


# --------------------------------------------------------------------------- configure


def configure(src: Path, obj: Path, fragments: Sequence[kconfig.Fragment], *, log: Path,
              progress: Progress) -> dict[str, str]:
    """tinyconfig + fragments via merge_config.sh; check every request; return the .config."""
    make = ["make", f"O={obj}"]
    run_logged([*make, "tinyconfig"], cwd=src, log=log, progress=progress,
               what="make tinyconfig")
    frag_dir = obj / "testbed-fragments"
    if frag_dir.exists():
        shutil.rmtree(frag_dir)
    frag_dir.mkdir()
    files = [frag_dir / "00-tinyconfig.config"]
    shutil.copyfile(obj / ".config", files[0])
    for i, frag in enumerate(fragments, 1):
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(frag.name).name)[:40]
        f = frag_dir / f"{i:02d}-{stem}.config"
        f.write_text(frag.text if frag.text.endswith("\n") else frag.text + "\n")
        files.append(f)
    script = src / "scripts" / "kconfig" / "merge_config.sh"
    if not script.is_file():
        raise BuildError(f"{script} missing: the base tree is not a complete kernel tree")
    out = run_logged(["sh", str(script), "-O", str(obj), *map(str, files)], cwd=src, log=log,
                     progress=progress, what="merge_config.sh")
    final_text = (obj / ".config").read_text(errors="replace")
    final = kconfig.parse_config(final_text)
    requested = kconfig.requested_options(fragments)
    mismatches = kconfig.check_config(requested, final)
    reported = {sym for sym, _, _ in kconfig.parse_merge_config_output("\n".join(out))}
    missed = [m.symbol for m in mismatches if m.symbol not in reported]
    if missed:  # our check is stricter (e.g. =n vs absent); note where the two disagree
        with log.open("a") as fh:
            fh.write(f"# testbed: merge_config.sh did not report {', '.join(missed)}\n")
    if not mismatches:
        return final
    index = kconfig.KconfigIndex.load(src)
    mismatches, skipped = kconfig.split_unknown(mismatches, index, [str(kconfig.BASE_FRAGMENT)])
    if skipped:
        with log.open("a") as fh:
            fh.write("# testbed: not defined in this tree, skipped (base.config names options "
                     f"of several kernel versions): {', '.join(m.symbol for m in skipped)}\n")
    if mismatches:
        lines = kconfig.explain_mismatches(mismatches, src, final, index=index)
        with log.open("a") as fh:
            fh.writelines(f"# testbed: {ln}\n" for ln in lines)
        more = f" (and {len(lines) - 1} more, see {log})" if len(lines) > 1 else ""
        raise BuildError(f"config option did not stick: {lines[0]}{more}")
    return final


# --------------------------------------------------------------------------- build

# Object folders kept per base tree (one per distinct set of config fragments);
# the least recently used beyond this are deleted (each is 1-2 GB with DWARF).
KEEP_BUILD_TREES = 3


def _seed_build_tree(origin: Path, obj: Path, log: Path, progress: Progress) -> str:
    """Start a new object folder as a copy of the most recently used one of the same base.

    Kbuild tracks each object's command line and its dependencies on single config
    symbols (fixdep), so after the new config only what it changes is rebuilt; a new
    config on a known base is an incremental build, not a cold one. The host tools
    under ``tools/`` (objtool, resolve_btfids) record absolute paths of their folder in
    their .cmd/.d files: those are rewritten to the new folder, keeping their times
    (every kernel object depends on the objtool binary: rebuilding it would rebuild all).
    """
    donors = sorted((d for d in origin.glob("obj-*")
                     if d != obj and "." not in d.name and (d / "vmlinux").is_file()),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    if not donors:
        return ""
    donor = donors[0]
    progress.update(f"seeding build tree from {donor.name}", force=True)
    tmp = obj.with_name(obj.name + ".seeding")
    if tmp.exists():
        shutil.rmtree(tmp)
    run_logged(["cp", "-a", "--reflink=auto", str(donor), str(tmp)], cwd=origin, log=log,
               progress=progress, what="seed build tree")
    _relocate_tool_records(tmp / "tools", str(donor), str(obj))
    # keep the configuration just made (newer than the donor's auto.conf: make syncs it)
    shutil.copyfile(obj / ".config", tmp / ".config")
    shutil.rmtree(tmp / "testbed-fragments", ignore_errors=True)
    if (obj / "testbed-fragments").is_dir():
        shutil.copytree(obj / "testbed-fragments", tmp / "testbed-fragments")
    shutil.rmtree(obj)
    tmp.rename(obj)
    os.utime(obj)
    return donor.name


def _relocate_tool_records(tools: Path, old: str, new: str) -> None:
    old_b, new_b = old.encode(), new.encode()
    for f in tools.rglob("*"):
        if f.suffix not in (".cmd", ".d") or not f.is_file():
            continue
        data = f.read_bytes()
        if old_b in data:
            st = f.stat()
            f.write_bytes(data.replace(old_b, new_b))
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))


def _prune_build_trees(origin: Path, keep: int, current: Path) -> None:
    """Keep the ``keep`` most recently used complete object trees; drop the rest, and
    drop incomplete ones (a config that did not stick, an interrupted seed) but ``current``."""
    complete = []
    for d in origin.glob("obj-*"):
        if not d.is_dir() or d == current:
            continue
        if "." in d.name or not (d / "vmlinux").is_file():
            shutil.rmtree(d, ignore_errors=True)
        else:
            complete.append(d)
    complete.sort(key=lambda d: d.stat().st_mtime, reverse=True)
    for old in complete[max(keep - 1, 0):]:
        shutil.rmtree(old, ignore_errors=True)


def build_kernel(
    series: str | os.PathLike[str] | None = None,
    config_fragments: Sequence[str | os.PathLike[str]] = (),
    source: str | os.PathLike[str] | None = None,
    jobs: int | None = None,
    *,
    force: bool = False,
    run_dir: Path | None = None,
) -> KernelBuild:
    """Build (or find in the cache) a kernel: base tree + series + config fragments.

    ``series``: None, a name under kernel-patches/, a quilt folder, an mbox or a patch.
    ``config_fragments``: files, names under kernel-patches/, or inline ``CONFIG_X=v``;
    applied after kernel-patches/base.config and the series' own ``config`` file.
    ``source``: None for Debian's linux-source-6.1, or a tarball or git tree.
    ``force``: rebuild even when the cache has it.
    """
    start = time.monotonic()
    progress = Progress("kernel build")
    try:
        return _build_kernel(series, config_fragments, source, jobs, force, run_dir, start,
                             progress)
    finally:
        progress.close()  # the heartbeat stops on every way out (cached, failed, built)


@dataclass(frozen=True)
class KernelPlan:
    """What a build would be, named before anything is built: its cache key and inputs."""

    key: str
    base: BaseSource
    series: Series
    fragments: list[kconfig.Fragment]
    toolchain: dict[str, str]

    @property
    def dir(self) -> Path:
        return kernels_dir() / self.key

    @property
    def cached(self) -> bool:
        return _complete(self.dir)


def plan_kernel(series: str | os.PathLike[str] | None = None,
                config_fragments: Sequence[str | os.PathLike[str]] = (),
                source: str | os.PathLike[str] | None = None) -> KernelPlan:
    """The cache key of a build (and what goes into it) without building: `testbed kernel
    key` prints it for CI caches (the key changes with the base, series, fragments and
    toolchain, and with nothing else)."""
    base = resolve_source(source, work_dir())
    ser = load_series(series)
    fragments = [kconfig.load_fragment(kconfig.BASE_FRAGMENT)]
    if ser.config_fragment is not None:
        fragments.append(kconfig.load_fragment(ser.config_fragment))
    fragments.extend(kconfig.load_fragment(f) for f in config_fragments)
    toolchain = toolchain_versions()
    if toolchain["cc"] == "missing" or toolchain["make"] == "missing":
        raise BuildError("no C compiler or make on this host (install gcc and make)")
    key = cache_key(base.identity, ser, fragments, toolchain)
    return KernelPlan(key, base, ser, fragments, toolchain)


def _build_kernel(series: str | os.PathLike[str] | None,
                  config_fragments: Sequence[str | os.PathLike[str]],
                  source: str | os.PathLike[str] | None, jobs: int | None, force: bool,
                  run_dir: Path | None, start: float, progress: Progress) -> KernelBuild:
    plan = plan_kernel(series, config_fragments, source)
    base, ser, fragments, toolchain, key = (plan.base, plan.series, plan.fragments,
                                            plan.toolchain, plan.key)
    out_dir = plan.dir
    if not force and _complete(out_dir):
        return _from_dir(out_dir, cached=True, seconds=time.monotonic() - start)

    run_dir = run_dir or paths.new_run_dir("kernel-build")
    progress.update(f"building kernel {key} (series {ser.name or 'none'}); log "
                    f"{run_dir / 'build.log'}", force=True)
    log = run_dir / "build.log"
    log.touch()
    origin = work_dir() / base.origin_id
    origin.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(origin / "lock", progress):
            if not force and _complete(out_dir):  # someone built it while we waited
                return _from_dir(out_dir, cached=True, seconds=time.monotonic() - start)
            result = _build_locked(base, ser, fragments, toolchain, key, origin, log, progress,
                                   jobs or os.cpu_count() or 1, start)
    except BuildError as exc:
        progress.done("failed")
        if exc.run_dir is None:
            exc.run_dir = run_dir
        raise
    progress.done(f"done in {result.seconds:.0f}s")
    return result


def _build_locked(base: BaseSource, ser: Series, fragments: list[kconfig.Fragment],
                  toolchain: dict[str, str], key: str, origin: Path, log: Path,
                  progress: Progress, jobs: int, start: float) -> KernelBuild:
    src = origin / "src"
    progress.update(f"preparing base tree {base.label}", force=True)
    base_commit = prepare_repo(base, src, log)
    progress.update(f"applying series {ser.name or '(none)'}", force=True)
    head = apply_series(src, base_commit, ser)
    kver = kernel_version(src)
    obj = origin / f"obj-{_config_id(base, fragments, toolchain)}"
    obj.mkdir(parents=True, exist_ok=True)
    os.utime(obj)  # most recently used; see _prune_build_trees
    _prune_build_trees(origin, keep=KEEP_BUILD_TREES, current=obj)

    configure(src, obj, fragments, log=log, progress=progress)
    seeded_from = ""
    if not (obj / "vmlinux").is_file():  # a config that stuck, in a new tree: seed it
        seeded_from = _seed_build_tree(origin, obj, log, progress)
    incremental = (obj / "vmlinux").is_file()
    t_make = time.monotonic()
    run_logged(["make", f"O={obj}", f"-j{jobs}", "bzImage"], cwd=src, log=log,
               progress=progress, what="make bzImage")
    make_seconds = time.monotonic() - t_make
    release = subprocess.run(["make", "-s", "--no-print-directory", f"O={obj}", "kernelrelease"],
                             cwd=src, capture_output=True, text=True, check=False,
                             env={**os.environ, **MAKE_ENV}).stdout.strip().splitlines()

    out_dir = kernels_dir() / key
    tmp = kernels_dir() / f".{key}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for src_name, dst_name in (("arch/x86/boot/bzImage", "bzImage"), ("vmlinux", "vmlinux"),
                               (".config", "config"), ("System.map", "System.map")):
        if not (obj / src_name).is_file():
            raise BuildError(f"make succeeded but {src_name} is missing (log: {log})")
        shutil.copyfile(obj / src_name, tmp / dst_name)
    seconds = time.monotonic() - start
    base_version = f"{base.label} (make kernelversion {kver})"
    meta: dict[str, Any] = {
        "key": key,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_version": base_version,
        "base": {"kind": base.kind, "path": str(base.path), "identity": base.identity,
                 "package_version": base.package_version, "kernelversion": kver,
                 "commit": base_commit},
        "kernel_release": release[-1] if release else kver,
        "series": {"name": ser.name, "kind": ser.kind, "origin": ser.origin,
                   "patches": ser.fingerprint(), "head": head},
        "fragments": [f.name for f in fragments],
        "toolchain": toolchain,
        "pipeline": PIPELINE_VERSION,
        "incremental": incremental,
        "seeded_from": seeded_from,
        "make_seconds": round(make_seconds, 1),
        "total_seconds": round(seconds, 1),
        "jobs": jobs,
        "build_tree": str(obj),
        "run_log": str(log),
    }
    shutil.copyfile(log, tmp / "build.log")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return _from_dir(out_dir, cached=False, seconds=seconds)


def kernel_facts(bzimage: Path) -> dict[str, str]:
    """What a report says about the kernel under test: its path, the vmlinux beside it,
    the cache key, series and base version when it is a cached build, and the release
    read from the image itself (the bzImage's version string: never empty for a kernel
    that has one)."""
    from testbed.boot.kernelimage import inspect_kernel

    path = Path(bzimage)
    facts = {"path": str(path), "vmlinux": "", "key": "", "series": "", "base_version": "",
             "osrelease": "", "version": ""}
    vmlinux = path.with_name("vmlinux")
    if vmlinux.is_file():
        facts["vmlinux"] = str(vmlinux)
    try:
        info = inspect_kernel(path)
        facts["osrelease"], facts["version"] = info.release, info.version
    except Exception:  # a report of a run whose kernel is gone keeps the rest
        pass
    meta_file = path.with_name("meta.json")
    if path.name == "bzImage" and meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            meta = {}
        facts["key"] = str(meta.get("key", ""))
        facts["series"] = str(meta.get("series", {}).get("name", "") or "")
        facts["base_version"] = str(meta.get("base_version", ""))
        if not facts["osrelease"]:
            facts["osrelease"] = str(meta.get("kernel_release", ""))
    return facts
