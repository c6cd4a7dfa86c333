import re
import shutil
import subprocess

import pytest

from testbed.build.cpio import Entry, archive


def sample() -> list[Entry]:
    return [
        Entry.file("bin/hello", b"#!/bin/sh\necho hi\n", 0o755),
        Entry.symlink("bin/sh", "busybox"),
        Entry.chardev("dev/console", 5, 1),
        Entry.dir("tmp", 0o1777),
        Entry.file("etc/a/b/c.txt", b"x" * 5),
    ]


def test_same_entries_same_bytes_any_order():
    a = archive(sample())
    b = archive(list(reversed(sample())))
    assert a == b


def test_content_change_changes_bytes():
    other = sample()
    other[0] = Entry.file("bin/hello", b"#!/bin/sh\necho ho\n", 0o755)
    assert archive(other) != archive(sample())


def test_rejects_escaping_paths():
    with pytest.raises(ValueError):
        archive([Entry.file("../etc/passwd", b"")])


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio not installed")
def test_gnu_cpio_reads_it_back():
    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archive(sample()), capture_output=True, check=True
    ).stdout.decode()
    lines = listing.splitlines()
    names = [ln.split()[-1] if "->" not in ln else ln.split()[-3] for ln in lines]
    assert names == sorted(names)
    assert {"bin", "bin/hello", "bin/sh", "dev", "dev/console", "etc", "etc/a", "etc/a/b",
            "etc/a/b/c.txt", "tmp"} == set(names)
    console = next(ln for ln in lines if ln.endswith("dev/console"))
    assert console.startswith("crw-------")
    assert re.search(r"\b5,\s+1\b", console)
    assert any(ln.startswith("drwxrwxrwt") and ln.endswith(" tmp") for ln in lines)
    assert all(" root " in ln for ln in lines)
