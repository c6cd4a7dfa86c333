"""Base kernel trees: Debian's linux-source tarball, another tarball, or a user's git tree.

Every base is turned into a git repository in the cache that the build owns
(the user's tree is never written to): a tarball is unpacked and committed
once; a git tree is cloned with ``--shared`` (no object copy) and its commit
checked out, with uncommitted changes (``git diff HEAD``) applied on top.
Builds then move this repository between commits (base, base + series), so
``make`` sees only the files that changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from testbed.build.series import GIT_ENV, run_git
from testbed.errors import BuildError

DEBIAN_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
DEBIAN_PACKAGE = "linux-source-6.1"


@dataclass(frozen=True)
class BaseSource:
    """What a build starts from, and how to name it."""

    kind: str  # "debian", "tarball", "git"
    path: Path
    identity: str  # content identity that goes into the cache key
    label: str  # human-readable base version (before the tree is prepared)
    package_version: str = ""  # Debian package version, for the Debian tarball
    commit: str = ""  # for git trees: the commit
    local_diff: bytes = b""  # for git trees: uncommitted changes to tracked files

    @property
    def origin_id(self) -> str:
        """Which work repository in the cache serves this base (one per tarball or git tree)."""
        if self.kind == "git":
            return "git-" + hashlib.sha256(str(self.path).encode()).hexdigest()[:16]
        return "tar-" + self.identity.split(":")[-1][:16]


def _file_sha256(path: Path, memo_dir: Path) -> str:
    """sha256 of a (large) file, memoised by path, size and mtime."""
    st = path.stat()
    memo = memo_dir / "file-hashes.json"
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    table: dict[str, str] = {}
    if memo.is_file():
        try:
            table = json.loads(memo.read_text())
        except ValueError:
            table = {}
    if key in table:
        return table[key]
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    table[key] = h.hexdigest()
    memo_dir.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.replace(memo)
    return table[key]


def debian_package_version(package: str = DEBIAN_PACKAGE) -> str:
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                             capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def resolve_source(source: str | os.PathLike[str] | None, memo_dir: Path) -> BaseSource:
    """Name the base tree and compute its identity without unpacking it."""
    if source is None:
        if not DEBIAN_TARBALL.is_file():
            raise BuildError(f"base kernel source missing: {DEBIAN_TARBALL} (install the Debian "
                             f"package {DEBIAN_PACKAGE}, or pass --source TREE|TARBALL)")
        version = debian_package_version()
        digest = _file_sha256(DEBIAN_TARBALL, memo_dir)
        return BaseSource(kind="debian", path=DEBIAN_TARBALL,
                          identity=f"debian:{DEBIAN_PACKAGE}={version}:sha256:{digest}",
                          label=f"{DEBIAN_PACKAGE} {version}".strip(), package_version=version)
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise BuildError(f"kernel source not found: {source}")
    if path.is_file():
        if not tarfile.is_tarfile(path):
            raise BuildError(f"kernel source {path} is not a tarball nor a folder")
        digest = _file_sha256(path, memo_dir)
        return BaseSource(kind="tarball", path=path, identity=f"tarball:sha256:{digest}",
                          label=path.name)
    if not (path / "Makefile").is_file() or not (path / "Kconfig").is_file():
        raise BuildError(f"kernel source {path} is not a kernel tree (no Makefile and Kconfig)")
    top = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel"],
                         capture_output=True, text=True, check=False)
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != path:
        raise BuildError(f"kernel source {path} is a folder but not the top of a git tree: "
                         f"commit it (git init && git add -A && git commit) or pass a tarball")
    commit = run_git(["rev-parse", "HEAD"], cwd=path, what=f"read HEAD of {path}").decode().strip()
    diff = run_git(["diff", "HEAD", "--binary", "--no-color", "--no-ext-diff"], cwd=path,
                   what=f"read local changes in {path}")
    ident = f"git:{commit}"
    if diff:
        ident += ":dirty:" + hashlib.sha256(diff).hexdigest()
    describe = subprocess.run(["git", "-C", str(path), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, check=False).stdout.strip()
    return BaseSource(kind="git", path=path, identity=ident, label=f"{path.name} {describe}",
                      commit=commit, local_diff=diff)


def _tar_top(path: Path) -> str | None:
    """The single top-level folder of a tarball, if it has one (read from the first entry)."""
    with tarfile.open(path) as tf:
        first = tf.next()
        if first is None:
            raise BuildError(f"kernel source tarball {path} is empty")
        name = first.name.lstrip("./")
        top = name.split("/", 1)[0]
        return top if (first.isdir() or "/" in name) else None


def prepare_repo(base: BaseSource, repo: Path, log: Path) -> str:
    """Make ``repo`` a git repository holding the base; return the base commit.

    Idempotent: the base commit is remembered in ``repo/../base-commits.json``.
    """
    memo = repo.parent / "base-commits.json"
    table: dict[str, str] = json.loads(memo.read_text()) if memo.is_file() else {}
    if base.identity in table and (repo / ".git").is_dir():
        commit = table[base.identity]
        ok = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", commit + "^{commit}"],
                            capture_output=True, check=False).returncode == 0
        if ok:
            return commit
    if base.kind == "git":
        commit = _prepare_git(base, repo)
    else:
        commit = _prepare_tarball(base, repo, log)
    table[base.identity] = commit
    memo.write_text(json.dumps(table, indent=1))
    return commit


def _prepare_tarball(base: BaseSource, repo: Path, log: Path) -> str:
    if repo.exists():
        shutil.rmtree(repo)
    tmp = Path(tempfile.mkdtemp(prefix="unpack-", dir=repo.parent))
    try:
        top = _tar_top(base.path)
        args = ["tar", "-xf", str(base.path), "-C", str(tmp)]
        if top:
            args.append("--strip-components=1")
        with log.open("ab") as fh:
            fh.write(f"$ {' '.join(args)}\n".encode())
            fh.flush()
            proc = subprocess.run(args, stdout=fh, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            raise BuildError(f"cannot unpack {base.path} (tar exit {proc.returncode}, see {log})")
        if not (tmp / "Makefile").is_file() or not (tmp / "Kconfig").is_file():
            raise BuildError(f"{base.path} does not hold a kernel tree (no Makefile and Kconfig)")
        run_git(["init", "-q"], cwd=tmp, what="init the base repository")
        run_git(["-c", "core.bigFileThreshold=1m", "-c", "core.compression=1", "add", "-A", "-f"],
                cwd=tmp, what="add the base tree")
        run_git(["commit", "-q", "--no-verify", "-m", f"base: {base.label}\n\n{base.identity}"],
                cwd=tmp, what="commit the base tree")
        tmp.rename(repo)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return run_git(["rev-parse", "HEAD"], cwd=repo, what="read base commit").decode().strip()


def _prepare_git(base: BaseSource, repo: Path) -> str:
    if not (repo / ".git").is_dir():
        if repo.exists():
            shutil.rmtree(repo)
        run_git(["clone", "-q", "--shared", "--no-checkout", str(base.path), str(repo)],
                cwd=repo.parent, what=f"clone {base.path}")
    else:
        # the objects live in the user's repository (alternates); fetch refs for safety
        run_git(["fetch", "-q", str(base.path), base.commit], cwd=repo, check=False,
                what=f"fetch {base.commit[:12]}")
    ok = subprocess.run(["git", "-C", str(repo), "cat-file", "-e", base.commit + "^{commit}"],
                        capture_output=True, check=False, env={**os.environ, **GIT_ENV})
    if ok.returncode != 0:
        raise BuildError(f"commit {base.commit[:12]} of {base.path} not reachable from the cache")
    commit = base.commit
    if base.local_diff:
        from testbed.build.series import Patch, commit_series

        local = Patch(name="local-changes.diff", text=base.local_diff,
                      subject=f"uncommitted changes in {base.path}")
        commit = commit_series(repo, commit, [local], series_name="local changes")
    return commit


def kernel_version(repo: Path) -> str:
    """``make kernelversion`` of a tree (e.g. 6.1.192)."""
    proc = subprocess.run(["make", "-s", "--no-print-directory", "kernelversion"], cwd=repo,
                          capture_output=True, text=True, check=False)
    if proc.returncode == 0 and proc.stdout.strip():
        return proc.stdout.strip().splitlines()[-1]
    head = (repo / "Makefile").read_text(errors="replace")[:2000]
    parts = {k: v.strip() for k, v in re.findall(r"^(VERSION|PATCHLEVEL|SUBLEVEL|EXTRAVERSION)"
                                                 r"\s*=\s*(.*)$", head, re.M)}
    return "{}.{}.{}{}".format(parts.get("VERSION", "?"), parts.get("PATCHLEVEL", "?"),
                               parts.get("SUBLEVEL", "0"), parts.get("EXTRAVERSION", ""))
