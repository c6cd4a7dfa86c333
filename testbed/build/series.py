"""Patch series: find them, parse them, and apply them to a git-managed kernel tree.

A series is one of:

* a folder with a quilt-style ``series`` file: one patch per line, relative to
  the folder (quilt's ``patches/`` layout also works), ``#`` comments, blank
  lines, and per-patch options ``-pN`` (strip level, default 1) and ``-R``
  (apply reversed);
* an mbox (``git format-patch --stdout``, ``b4 am`` output, or lore's
  ``t.mbox.gz``): every message that carries a diff and is not a reply, in
  ``[PATCH n/m]`` order. Messages are split and parsed with ``git mailsplit``
  and ``git mailinfo``, the same plumbing ``git am`` runs;
* a single ``.patch``/``.diff`` file (a series of one);
* a name: ``kernel-patches/<name>/``.

Patches are applied with ``git apply --cached`` into a scratch index on top of
the base commit, one commit per patch, so the work tree is never touched by a
failing patch: it is only moved (``git reset --hard``) to the final commit once
every patch applied, and git rewrites only the files whose content changed, so
``make`` rebuilds only what the change of series touched.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import hashlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from testbed.errors import BuildError
from testbed.paths import PATCHES_DIR

SERIES_FILE = "series"
SERIES_CONFIG = "config"  # optional config fragment shipped inside a series folder


@dataclass(frozen=True)
class Patch:
    """One patch of a series, with its own apply options."""

    name: str  # as the series names it (relative path, or "0003 subject" for mbox)
    text: bytes
    strip: int = 1
    reverse: bool = False
    subject: str = ""
    author: str = ""
    message: str = ""  # commit message body

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text).hexdigest()


@dataclass(frozen=True)
class Series:
    """An ordered list of patches, with where they came from."""

    name: str
    kind: str  # "none", "quilt", "mbox", "patch"
    origin: str  # folder or file path ("" for none)
    patches: tuple[Patch, ...] = ()
    config_fragment: Path | None = None  # <series dir>/config, when it exists

    def fingerprint(self) -> list[dict[str, object]]:
        """What the cache key hashes: order, options and content of every patch."""
        return [
            {"name": p.name, "strip": p.strip, "reverse": p.reverse, "sha256": p.sha256}
            for p in self.patches
        ]


NO_SERIES = Series(name="", kind="none", origin="")


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class SeriesEntry:
    name: str
    strip: int = 1
    reverse: bool = False
    line: int = 0


def parse_series_text(text: str, *, where: str = SERIES_FILE) -> list[SeriesEntry]:
    """Parse a quilt ``series`` file. Raises BuildError on a malformed line."""
    entries: list[SeriesEntry] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        # quilt: '#' starts a comment anywhere on the line when preceded by blank.
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        words = line.split()
        name, opts = words[0], words[1:]
        if name.startswith("-"):
            raise BuildError(f"malformed series file {where}:{lineno}: expected a patch name "
                             f"first, got option {name!r}")
        strip, reverse = 1, False
        i = 0
        while i < len(opts):
            opt = opts[i]
            m = re.fullmatch(r"-p(\d+)", opt)
            if m:
                strip = int(m.group(1))
            elif opt == "-p" and i + 1 < len(opts) and opts[i + 1].isdigit():
                strip = int(opts[i + 1])
                i += 1
            elif opt in ("-R", "--reverse"):
                reverse = True
            else:
                raise BuildError(f"malformed series file {where}:{lineno}: unsupported option "
                                 f"{opt!r} for {name} (supported: -pN, -R)")
            i += 1
        if name in seen:
            raise BuildError(f"malformed series file {where}:{lineno}: {name} is listed twice")
        seen.add(name)
        entries.append(SeriesEntry(name=name, strip=strip, reverse=reverse, line=lineno))
    return entries


def _patch_header(text: bytes) -> tuple[str, str, str]:
    """Subject, author and message of a patch file in git format-patch or quilt form."""
    head = (b"\n" + text).split(b"\ndiff --git ", 1)[0].split(b"\n--- ", 1)[0].lstrip(b"\n")
    decoded = head.decode("utf-8", "replace")
    if decoded.startswith("From "):
        msg = email.message_from_string(decoded, policy=email.policy.default)
        subject = re.sub(r"^\[[^\]]*\]\s*", "", str(msg.get("Subject", "")))
        author = str(msg.get("From", ""))
        body = msg.get_payload()
        body_text = body if isinstance(body, str) else ""
        return subject, author, body_text.split("\n---\n", 1)[0].strip()
    decoded = decoded.split("\n---\n", 1)[0]
    lines = [ln for ln in decoded.splitlines() if ln.strip() and not ln.startswith("Index:")]
    return (lines[0].strip() if lines else ""), "", "\n".join(lines[1:]).strip()


def load_quilt_series(folder: Path, *, name: str | None = None) -> Series:
    folder = folder.resolve()
    series_file = folder / SERIES_FILE
    patch_dir = folder
    if not series_file.is_file() and (folder / "patches" / SERIES_FILE).is_file():
        patch_dir = folder / "patches"
        series_file = patch_dir / SERIES_FILE
    if not series_file.is_file():
        raise BuildError(f"malformed series: {folder} has no '{SERIES_FILE}' file")
    entries = parse_series_text(series_file.read_text(errors="replace"), where=str(series_file))
    patches: list[Patch] = []
    for entry in entries:
        path = patch_dir / entry.name
        if not path.is_file():
            raise BuildError(f"malformed series: {series_file}:{entry.line} names {entry.name}, "
                             f"which does not exist")
        text = path.read_bytes()
        if not has_diff(text):
            raise BuildError(f"malformed series: {entry.name} ({path}) contains no diff")
        subject, author, message = _patch_header(text)
        patches.append(Patch(name=entry.name, text=text, strip=entry.strip,
                             reverse=entry.reverse, subject=subject or entry.name,
                             author=author, message=message))
    cfg = folder / SERIES_CONFIG
    return Series(name=name or folder.name, kind="quilt", origin=str(folder),
                  patches=tuple(patches), config_fragment=cfg if cfg.is_file() else None)


_DIFF_RE = re.compile(rb"^(diff --git |--- \S|Binary files |GIT binary patch)", re.M)


def has_diff(text: bytes) -> bool:
    return bool(_DIFF_RE.search(text))


def _read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data


_SUBJ_NUM = re.compile(r"\[[^\]]*?(\d+)/(\d+)[^\]]*\]")


def load_mbox(path: Path, *, name: str | None = None) -> Series:
    """Parse an mbox into patches with git's own mail plumbing (mailsplit + mailinfo)."""
    data = _read_maybe_gz(path)
    if not data.lstrip().startswith(b"From "):
        raise BuildError(f"malformed series: {path} is not an mbox (no 'From ' line at the start)")
    found: list[tuple[int, int, Patch]] = []
    with tempfile.TemporaryDirectory(prefix="testbed-mbox-") as tmp:
        tmpd = Path(tmp)
        (tmpd / "in.mbox").write_bytes(data)
        (tmpd / "msgs").mkdir()
        run_git(["mailsplit", "-o" + str(tmpd / "msgs"), "--keep-cr", str(tmpd / "in.mbox")],
                cwd=tmpd, what=f"split mbox {path}")
        for index, msg in enumerate(sorted((tmpd / "msgs").iterdir())):
            patch_file, msg_file = tmpd / "patch", tmpd / "msg"
            info = run_git(["mailinfo", "-k", str(msg_file), str(patch_file)], cwd=tmpd,
                           what=f"parse message {index + 1} of {path}",
                           stdin=msg.read_bytes()).decode("utf-8", "replace")
            fields = dict(
                (k.strip(), v.strip())
                for k, _, v in (ln.partition(":") for ln in info.splitlines())
                if _
            )
            raw_subject = fields.get("Subject", "")
            diff = patch_file.read_bytes()
            if not has_diff(diff) or re.match(r"(?i)^\s*(re|aw|fwd?):", raw_subject):
                continue  # cover letter, reply or review
            m = _SUBJ_NUM.search(raw_subject)
            number = int(m.group(1)) if m else index + 1
            subject = re.sub(r"^(\[[^\]]*\]\s*)+", "", raw_subject).strip()
            author = f"{fields.get('Author', '')} <{fields.get('Email', '')}>"
            patch_name = f"{number:04d}-{_slug(subject)}"
            found.append((number, index, Patch(
                name=patch_name, text=diff, strip=1, subject=subject, author=author,
                message=msg_file.read_text(errors="replace").strip())))
    if not found:
        raise BuildError(f"malformed series: mbox {path} contains no patches")
    numbers = [n for n, _, _ in found]
    if len(set(numbers)) != len(numbers):
        dup = sorted({n for n in numbers if numbers.count(n) > 1})
        raise BuildError(f"malformed series: mbox {path} has more than one patch numbered "
                         f"{dup[0]} (several versions in one mbox? use `b4 am -v N`)")
    found.sort(key=lambda t: (t[0], t[1]))
    stem = path.name.removesuffix(".gz").removesuffix(".mbox").removesuffix(".mbx")
    return Series(name=name or stem, kind="mbox", origin=str(path.resolve()),
                  patches=tuple(p for _, _, p in found))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:52] or "patch"


def load_series(spec: str | os.PathLike[str] | None, *, patches_dir: Path = PATCHES_DIR) -> Series:
    """Resolve ``None``, a name under kernel-patches/, a folder, an mbox or a patch file."""
    if spec is None or str(spec) in ("", "none"):
        return NO_SERIES
    path = Path(spec).expanduser()
    if not path.exists() and os.sep not in str(spec) and (patches_dir / str(spec)).exists():
        path = patches_dir / str(spec)
        if path.is_dir():
            return load_quilt_series(path, name=str(spec))
    if path.is_dir():
        return load_quilt_series(path)
    if path.is_file():
        head = _read_maybe_gz(path)[:4096]
        if head.lstrip().startswith(b"From ") and not _is_single_format_patch(path):
            return load_mbox(path)
        text = path.read_bytes()
        if not has_diff(text):
            raise BuildError(f"malformed series: {path} is neither an mbox nor a patch")
        subject, author, message = _patch_header(text)
        return Series(name=path.stem, kind="patch", origin=str(path.resolve()),
                      patches=(Patch(name=path.name, text=text, subject=subject or path.name,
                                     author=author, message=message),))
    raise BuildError(f"series not found: {spec} (not a folder, mbox or patch file, "
                     f"nor a name under {patches_dir})")


def _is_single_format_patch(path: Path) -> bool:
    """A lone `git format-patch` file is an mbox of one; treat .patch/.diff files as patches."""
    return path.suffix in (".patch", ".diff")


# --------------------------------------------------------------------------- hunks


@dataclass(frozen=True)
class Hunk:
    file: str  # path after stripping
    header: str  # the "@@ -a,b +c,d @@ ..." line
    old_start: int


def parse_hunks(text: bytes, strip: int = 1) -> list[Hunk]:
    """Files and hunk headers of a unified diff, in order."""
    hunks: list[Hunk] = []
    current = ""
    lines = text.decode("utf-8", "replace").splitlines()
    for i, line in enumerate(lines):
        if line.startswith("diff --git "):
            parts = line.split()
            if len(parts) >= 4:
                current = _strip_path(parts[3], strip)
        elif line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            old = lines[i].split(None, 1)[1].split("\t")[0]
            new = lines[i + 1].split(None, 1)[1].split("\t")[0]
            current = _strip_path(new if new != "/dev/null" else old, strip)
        elif line.startswith("@@ "):
            m = re.match(r"@@ -(\d+)", line)
            hunks.append(Hunk(file=current, header=line.strip(),
                              old_start=int(m.group(1)) if m else 0))
    return hunks


def _strip_path(path: str, strip: int) -> str:
    parts = path.split("/")
    return "/".join(parts[strip:]) if len(parts) > strip else parts[-1]


def describe_failure(patch: Patch, stderr: str) -> str:
    """Name the first rejected hunk (file and header) from git apply's complaint."""
    hunks = parse_hunks(patch.text, patch.strip)
    m = re.search(r"patch failed: (.+):(\d+)", stderr)
    if m:
        fname, line = m.group(1), int(m.group(2))
        for h in hunks:
            if h.file == fname and h.old_start == line:
                return f"{fname}: {h.header}"
        for h in hunks:
            if h.file == fname:
                return f"{fname}: {h.header} (near line {line})"
        return f"{fname}:{line}"
    for pat, why in ((r"error: (.+?): No such file or directory", "file missing"),
                     (r"error: (.+?): does not exist in index", "file missing"),
                     (r"error: (.+?): already exists in (?:index|working directory)",
                      "file already exists")):
        m = re.search(pat, stderr)
        if m:
            fname = m.group(1)
            first = next((h.header for h in hunks if h.file == fname), "")
            return f"{fname}: {first} ({why})" if first else f"{fname} ({why})"
    first_err = next((ln.strip() for ln in stderr.splitlines() if ln.strip()), "git apply failed")
    return first_err.removeprefix("error: ")


# --------------------------------------------------------------------------- applying

GIT_ENV = {
    "GIT_AUTHOR_NAME": "testbed",
    "GIT_AUTHOR_EMAIL": "testbed@localhost",
    "GIT_COMMITTER_NAME": "testbed",
    "GIT_COMMITTER_EMAIL": "testbed@localhost",
    "GIT_AUTHOR_DATE": "2000-01-01T00:00:00 +0000",
    "GIT_COMMITTER_DATE": "2000-01-01T00:00:00 +0000",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_TERMINAL_PROMPT": "0",
}


def run_git(args: Sequence[str], *, cwd: Path, what: str, env: dict[str, str] | None = None,
            stdin: bytes | None = None, check: bool = True) -> bytes:
    full_env = {**os.environ, **GIT_ENV, **(env or {})}
    proc = subprocess.run(
        ["git", "-c", "core.autocrlf=false", "-c", "gc.auto=0", "-c", "advice.detachedHead=false",
         *args],
        cwd=cwd, env=full_env, input=stdin, capture_output=True, check=False)
    if check and proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        first = err[0] if err else f"exit status {proc.returncode}"
        raise BuildError(f"git failed to {what}: {first}")
    return proc.stdout


def _author_env(patch: Patch) -> dict[str, str]:
    m = re.match(r"\s*(.*?)\s*<([^>]*)>", patch.author or "")
    if not m or not m.group(2):
        return {}
    return {"GIT_AUTHOR_NAME": m.group(1) or m.group(2), "GIT_AUTHOR_EMAIL": m.group(2)}


def commit_series(repo: Path, base: str, patches: Iterable[Patch], *, series_name: str = "") -> str:
    """Apply patches on top of ``base`` in a scratch index; return the final commit.

    The work tree and the real index are not touched, so a patch that does not
    apply leaves the tree exactly as it was. Raises BuildError naming the patch
    and its first rejected hunk.
    """
    head = base
    with tempfile.TemporaryDirectory(prefix="testbed-index-") as tmp:
        env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
        run_git(["read-tree", base], cwd=repo, env=env, what=f"read base {base}")
        for number, patch in enumerate(patches, 1):
            pfile = Path(tmp) / "p.patch"
            pfile.write_bytes(patch.text)
            args = ["apply", "--cached", f"-p{patch.strip}", "--whitespace=nowarn"]
            if patch.reverse:
                args.append("-R")
            full_env = {**os.environ, **GIT_ENV, **env}
            proc = subprocess.run(["git", *args, str(pfile)], cwd=repo, env=full_env,
                                  capture_output=True, check=False)
            if proc.returncode != 0:
                where = describe_failure(patch, proc.stderr.decode("utf-8", "replace"))
                label = f"{series_name}: " if series_name else ""
                raise BuildError(f"patch does not apply: {label}{patch.name} "
                                 f"(#{number}): first rejected hunk {where}")
            tree = run_git(["write-tree"], cwd=repo, env=env, what="write tree").decode().strip()
            msg = (patch.subject or patch.name) + ("\n\n" + patch.message if patch.message else "")
            msg += f"\n\nTestbed-Patch: {patch.name}\n"
            head = run_git(["commit-tree", tree, "-p", head], cwd=repo,
                           env={**env, **_author_env(patch)}, stdin=msg.encode(),
                           what=f"commit {patch.name}").decode().strip()
    return head


def checkout_clean(repo: Path, commit: str) -> None:
    """Move the work tree to ``commit``, rewriting only files that differ; drop strays."""
    run_git(["reset", "-q", "--hard", commit], cwd=repo, what=f"check out {commit[:12]}")
    run_git(["clean", "-q", "-fdx"], cwd=repo, what="clean the tree")


def apply_series(repo: Path, base: str, series: Series) -> str:
    """Apply ``series`` on ``base`` and check the result out in ``repo``; return its commit.

    On failure the tree is left as it was (at whatever it was before), clean.
    """
    final = commit_series(repo, base, series.patches, series_name=series.name)
    checkout_clean(repo, final)
    return final
