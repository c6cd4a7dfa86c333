"""The RPAL reference kernel (kernel-patches/rpal-ref) in real guests.

For every injected bug (`rpal.bug=NAME`) the matching misbehaviour must be
visible in the guest; with no bug on, none of it may be. The workloads are
the guest programs tb-rpal_pair, tb-rpal_stale_probe, tb-rpal_stray and
tb-rpal_limits (guest/*.c); each prints "ROLE: ok CHECK: ..." / "ROLE: FAIL CHECK: ..." and
exits non-zero when a check failed.

The kernel: the plugin's `rpal_kernel` fixture: $TESTBED_KERNEL (a bzImage)
if set, else `testbed kernel build --series rpal-ref` (from the cache, or
built: minutes, cold).

Everything that boots goes through `run_workloads()`, the one place that
talks to `testbed exec`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_testbed

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO / "kernel-patches" / "rpal-ref"

WORKLOADS = {
    "pair": "tb-rpal_pair",
    "same": "tb-rpal_pair --same-pkey",
    "stale": "tb-rpal_stale_probe",
    "stray": "tb-rpal_stray",
    "limits": "tb-rpal_limits",
}

# bug -> (workload that must fail, a line it must print)
EXPECTED = {
    "skip_peer_flush": ("stale", r"probe: FAIL (remap|protect|unmap): [1-9]\d* stale reads"),
    "keep_copy_on_release": ("pair", r"[AB]: FAIL release: .*no fault"),
    "keep_copy_on_exit": ("pair", r"A: FAIL exit_copy: .*no fault"),
    "same_pkey": ("same", r"[AB]: FAIL same_pkey: request .* -> [01] \(expected EKEYREJECTED\)"),
    "pkru_open": ("pair", r"[AB]: FAIL pkru: PKRU after enable 0,"),
    "untagged_mmap": ("pair", r"[AB]: FAIL mmap_tagged: .*SEGV_PKUERR pkey 0"),
    "pkey_free_allowed": ("pair", r"[AB]: FAIL keys_locked: pkey_free\(\d+\) -> 0"),
    "wrong_slot_copy": ("pair", r"[AB]: FAIL peer_read: .*no fault, value 0x"),
    "no_fault_redirect": ("pair", r"[AB]: FAIL fault_redirect: .*SIGSEGV"),
    "exhaustion_frees_id": ("limits", r"limits: FAIL ids: after ENOSPC the next exec got id 253, "
                                      r"which a live service holds"),
    "id_reused_at_once": ("limits", r"limits: FAIL id_delay: id \d+ came back \d+ ms after"),
    "peer_limit_off_by_one": ("limits", r"limits: FAIL peer_limit: request 15 of 15: .*C -> "
                                        r"ENOSPC"),
    "read_ignores_count": ("limits", r"limits: FAIL read_count: read 1 \(count 8\) returned 24 "
                                     r"and wrote past count"),
}


# --------------------------------------------------------------------------- plumbing


@dataclass
class Outcome:
    status: int
    output: str


# The kernel under test comes from the testbed's pytest plugin (testbed/pytest_plugin.py):
# the fixture `rpal_kernel` is $TESTBED_KERNEL, or the rpal-ref build from the cache,
# built when it is not there yet (a kernel build: minutes, cold).


def guest_script(names: list[str], commands: dict[str, str] | None = None) -> str:
    """Shell that runs each workload and brackets its output with markers."""
    cmds = {**WORKLOADS, **(commands or {})}
    lines = []
    for n in names:
        lines.append(f"echo '@@@ begin {n}'")
        lines.append(f"{cmds[n]} 2>&1")
        lines.append(f"echo \"@@@ end {n} $?\"")
    lines.append("cat /sys/module/rpal/parameters/bug | sed 's/^/@@@ bugs /'")
    return "\n".join(lines)


def parse(stdout: str) -> dict[str, Outcome]:
    out: dict[str, Outcome] = {}
    for m in re.finditer(r"^@@@ begin (\w+)\n(.*?)^@@@ end \1 (\d+)$", stdout, re.S | re.M):
        out[m.group(1)] = Outcome(int(m.group(3)), m.group(2))
    return out


def run_workloads(kernel: Path, names: list[str], *, bugs: str = "", paging: int = 5,
                  pti: str = "auto", append: str = "", commands: dict[str, str] | None = None,
                  ) -> tuple[dict[str, Outcome], str]:
    """Boot `kernel` with rpal.bug=`bugs`, run the workloads, return their outcomes."""
    args = ["exec", "--kernel", str(kernel), "--paging", str(paging), "--pti", pti,
            "--timeout", "300"]
    cmdline = " ".join(x for x in (f"rpal.bug={bugs}" if bugs else "", append) if x)
    if cmdline:
        args += ["--append", cmdline]
    res = run_testbed(*args, "--", "sh", "-c", guest_script(names, commands), timeout=900)
    text = res.stdout + res.stderr
    found = parse(res.stdout)
    assert set(found) == set(names), f"exec status {res.returncode}:\n{text[-3000:]}"
    m = re.search(r"^@@@ bugs (.*)$", res.stdout, re.M)
    assert m and set(m.group(1).split(",")) == set((bugs or "none").split(",")), text[-2000:]
    return found, text


# --------------------------------------------------------------------------- host-only checks


def test_series_file_lists_the_patches_in_order():
    names = [ln.strip() for ln in (SERIES / "series").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert names == sorted(p.name for p in SERIES.glob("*.patch"))
    assert (SERIES / "config").read_text().count("CONFIG_RPAL=y") == 1


def test_every_injected_bug_is_documented_and_in_the_kernel():
    readme = (SERIES / "README.md").read_text()
    patches = "".join(p.read_text() for p in SERIES.glob("*.patch"))
    for bug in EXPECTED:
        assert f"`{bug}`" in readme, bug
        assert f'"{bug}"' in patches, bug


def test_guest_abi_header_mirrors_the_uapi_header():
    """Same ioctl numbers and constants in guest/lib/rpal.h as in the patch's uapi header."""
    patches = "".join(p.read_text() for p in SERIES.glob("*.patch"))
    uapi = re.search(r"\+\+\+ b/include/uapi/linux/rpal\.h\n(.*?)(?=^diff --git)", patches,
                     re.S | re.M)
    assert uapi
    kern = {m.group(1): m.group(2) for m in re.finditer(
        r"^\+#define (RPAL_\w+)\s+(_IO\w*\(RPAL_IOCTL_MAGIC, \d+[^)]*\)|\S+)", uapi.group(1), re.M)}
    guest = {m.group(1): m.group(2) for m in re.finditer(
        r"^#define (RPAL_\w+)\s+(_IO\w*\(RPAL_IOCTL_MAGIC, \d+[^)]*\)|\S+)",
        (REPO / "guest/lib/rpal.h").read_text(), re.M)}
    norm = {k: v.replace("__u64", "uint64_t") for k, v in kern.items()}
    assert len(norm) >= 20
    for k, v in norm.items():
        assert guest.get(k) == v, (k, v, guest.get(k))


# --------------------------------------------------------------------------- guests


@pytest.mark.vm
@pytest.mark.parametrize("paging,pti", [(5, "auto"), (4, "auto"), (5, "on"), (4, "on")],
                         ids=["5level", "4level", "5level-pti", "4level-pti"])
def test_no_bug_no_misbehaviour(rpal_kernel: Path, runs_dir: Path, paging: int, pti: str):
    found, text = run_workloads(rpal_kernel, list(WORKLOADS), paging=paging, pti=pti)
    for name, o in found.items():
        assert o.status == 0, f"{name} failed with no bug on:\n{o.output}"
        assert "FAIL" not in o.output, o.output
    caps = re.search(r"rpal_pair: api 1, caps (.*)", found["pair"].output)
    assert caps, found["pair"].output
    assert ("5level" if paging == 5 else "4level") in caps.group(1)
    if pti == "on":
        assert "pti" in caps.group(1).split()
    pair = found["pair"].output
    for check in ("peer_read", "fault_redirect", "pkey_deny", "peer_write", "release",
                  "dead_key", "exit_copy", "pkru", "keys_locked", "mmap_tagged", "fork_child"):
        assert re.search(rf"^[AB]: ok {check}:", pair, re.M), check
    assert re.search(r"A: ok same_pkey: .*-> EKEYREJECTED", found["same"].output)
    assert re.search(r"stray: ok gadget: weakness shown", found["stray"].output)
    assert re.search(r"stray: ok pkey_deny: .*SEGV_PKUERR", found["stray"].output)
    limits = found["limits"].output
    for check in ("peer_limit", "read_count", "ids", "id_delay"):
        assert re.search(rf"^limits: ok {check}:", limits, re.M), check


@pytest.mark.vm
@pytest.mark.parametrize("bug", sorted(EXPECTED))
def test_injected_bug_is_visible(rpal_kernel: Path, runs_dir: Path, bug: str):
    workload, pattern = EXPECTED[bug]
    found, text = run_workloads(rpal_kernel, [workload], bugs=bug)
    o = found[workload]
    assert o.status != 0, f"{workload} passed with rpal.bug={bug}:\n{o.output}"
    assert re.search(pattern, o.output, re.M), f"{pattern!r} not in:\n{o.output}"
    consoles = [d / "console.log" for d in runs_dir.iterdir() if (d / "console.log").is_file()]
    assert any(f"rpal: injected bug: {bug}" in c.read_text(errors="replace") for c in consoles)


@pytest.mark.vm
def test_skip_peer_flush_seen_with_4level_paging(rpal_kernel: Path, runs_dir: Path):
    found, _ = run_workloads(rpal_kernel, ["stale"], bugs="skip_peer_flush", paging=4)
    assert found["stale"].status == 1
    assert re.search(EXPECTED["skip_peer_flush"][1], found["stale"].output, re.M)


@pytest.mark.vm
def test_several_bugs_at_once(rpal_kernel: Path, runs_dir: Path):
    found, _ = run_workloads(rpal_kernel, ["pair", "same"], bugs="pkru_open,same_pkey")
    assert re.search(EXPECTED["pkru_open"][1], found["pair"].output, re.M)
    assert re.search(EXPECTED["same_pkey"][1], found["same"].output, re.M)


def test_guest_script_and_parser_agree():
    s = guest_script(["pair", "stale"])
    assert "tb-rpal_pair 2>&1" in s and 'echo "@@@ end stale $?"' in s
    fake = ("@@@ begin pair\nA: ok x: y\n@@@ end pair 0\n"
            "@@@ begin stale\nprobe: FAIL remap: 3\n@@@ end stale 1\n")
    got = parse(fake)
    assert got["pair"].status == 0 and "A: ok x" in got["pair"].output
    assert got["stale"].status == 1 and "FAIL remap" in got["stale"].output


def service_ids(output: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^[AB]: service key \d+ id (\d+)", output, re.M)]


@pytest.mark.vm
def test_ids_are_freed_only_after_the_delay(rpal_kernel: Path, runs_dir: Path):
    """Default delay (30 s): a second run gets new ids; with 300 ms they come back."""
    twice = {"first": "tb-rpal_pair", "second": "tb-rpal_pair",
             "later": "sleep 2; tb-rpal_pair"}
    found, _ = run_workloads(rpal_kernel, ["first", "second"], commands=twice)
    first, second = service_ids(found["first"].output), service_ids(found["second"].output)
    assert len(first) == len(second) == 2
    assert not set(first) & set(second), (first, second)
    found, _ = run_workloads(rpal_kernel, ["first", "later"], commands=twice,
                             append="rpal.id_free_delay_ms=300")
    first, later = service_ids(found["first"].output), service_ids(found["later"].output)
    assert sorted(first) == sorted(later), (first, later)


@pytest.mark.vm
@pytest.mark.parametrize("paging", [5, 4])
def test_protection_keys_selftest_still_passes(rpal_kernel: Path, runs_dir: Path, paging: int):
    """The kernel's own protection_keys selftest: RPAL's pkey hooks must not change a
    process that is not an RPAL service."""
    from testbed.build.selftests import build_selftest

    st = build_selftest("protection_keys")
    res = run_testbed("exec", "--kernel", str(rpal_kernel), "--paging", str(paging),
                      "--timeout", "600", "--file", f"{st.binary}:/usr/bin/pkeys-selftest",
                      "--", "pkeys-selftest", timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "PASSED" in res.stdout
    assert not re.search(r"FAIL|abort", res.stdout, re.I), res.stdout[-3000:]


PAGE_TABLE_BUGS = ["keep_copy_on_release", "keep_copy_on_exit", "wrong_slot_copy",
                   "no_fault_redirect"]


@pytest.mark.vm
@pytest.mark.parametrize("paging,pti", [(4, "auto"), (5, "on"), (4, "on")],
                         ids=["4level", "5level-pti", "4level-pti"])
@pytest.mark.parametrize("bug", PAGE_TABLE_BUGS)
def test_page_table_bugs_in_every_paging_mode(rpal_kernel: Path, runs_dir: Path, bug: str,
                                              paging: int, pti: str):
    """The copy lives in the PGD (4-level, folded P4D) or the P4D table (5-level), and with
    PTI in the user PGD too: each page-table bug must show in every mode."""
    workload, pattern = EXPECTED[bug]
    found, _ = run_workloads(rpal_kernel, [workload], bugs=bug, paging=paging, pti=pti)
    o = found[workload]
    assert o.status != 0 and re.search(pattern, o.output, re.M), o.output
