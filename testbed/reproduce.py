"""Reproducer scripts that work on another machine with the project checked out.

A reproducer (a scenario's `reproduce.sh`, explore's `failure-N.sh`) names no absolute
path of the machine that wrote it:

- the testbed is `$TESTBED`, else `testbed` on PATH, else `python3 -m testbed` (PRELUDE);
- a cached kernel build is named by its cache key and series (`--kernel KEY
  --kernel-series NAME`): where the cache lacks KEY, the series is built
  (`resolve_kernel_spec`); a kernel from elsewhere stays the path it was given;
- files of the run folder are named relative to the script (`"$HERE"/NAME`).
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

PROGRAM = "testbed"  # how the commands in a reproducer's comments call the testbed
# Shell run before a reproducer's exec: fixed text, nothing from the run in it.
PRELUDE = (
    'HERE=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)',
    'if [ -z "${TESTBED:-}" ]; then',
    '  if command -v testbed >/dev/null 2>&1; then TESTBED=testbed; '
    'else TESTBED="python3 -m testbed"; fi',
    'fi',
)
_KEY_RE = re.compile(r"[0-9a-f]{4,64}")


def kernel_args(kernel: Path) -> list[str]:
    """`--kernel KEY --kernel-series NAME` for a cached build, else `--kernel PATH`."""
    from testbed.snapshot.memdump import kernel_files

    info = kernel_files(kernel)
    key, series = info.get("kernel_key", ""), info.get("kernel_series", "")
    if key and (kernel.parent.name == key):
        return ["--kernel", key, *(["--kernel-series", series] if series else [])]
    return ["--kernel", str(kernel)]


def exec_line(args: Sequence[str], *tail: str) -> str:
    """`exec $TESTBED ARGS... TAIL... "$@"`: ARGS quoted, TAIL already shell words."""
    return " ".join(["exec $TESTBED", shlex.join(list(args)), *tail, '"$@"'])


def resolve_kernel_spec(spec: Path, series: str | None) -> Path:
    """A --kernel value (path, or a cached build's key); with `series`, a key the cache
    lacks is built from that series (said on stderr, with the key the build got)."""
    from testbed.boot.kernelimage import resolve_kernel
    from testbed.errors import BuildError

    text = str(spec)
    if series is None or spec.exists() or not _KEY_RE.fullmatch(text):
        return resolve_kernel(spec)
    from testbed.build.kernel import build_kernel, load_build

    try:
        return load_build(text).bzimage
    except BuildError:
        pass
    print(f"testbed: kernel {text} is not in this machine's cache: building series "
          f"{series}", file=sys.stderr)
    kb = build_kernel(series=series)
    if kb.key != text:
        print(f"testbed: series {series} built here as kernel {kb.key}, not {text} (another "
              "base tree, toolchain or patch content): running on it", file=sys.stderr)
    return kb.bzimage
