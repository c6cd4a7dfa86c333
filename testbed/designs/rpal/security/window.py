"""The moment of ENABLE: every PKRU the kernel writes while a service enables, seen from
the host through QEMU's gdbstub (row `enable_window`).

PKRU changes only through WRPKRU or XRSTOR; the kernel restores user XSAVE state
without the PKRU component and writes PKRU with WRPKRU (6.1: context switch, exec,
signal delivery, pkey_alloc, write_pkru()). `wrpkru_sites` finds every WRPKRU in the
vmlinux's executable sections (the gadget scanner, gadgets.py); `EnableWatch` puts a
breakpoint on each (under TCG a breakpoint is a translation-time check: an address
that is no instruction boundary is simply never hit) while the service enables, and
at each hit reads the value being written (EAX), the site and the task that runs
(`current_task` at GS base), through gdb/MI (pygdbmi), then lets the guest go on.
`judge_window` (pure) says whether a fully open PKRU (0) was ever written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from testbed.designs.rpal.security.gadgets import scan_bytes

GDB_SOCKET = "gdb.sock"
MAX_HITS = 10000


def wrpkru_sites(vmlinux: Path) -> list[tuple[int, str]]:
    """(address, function+offset) of every WRPKRU byte sequence in the vmlinux's
    executable sections (at any offset: the scanner's), named by the symbol table."""
    from bisect import bisect_right

    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import SymbolTableSection

    found: list[int] = []
    funcs: list[tuple[int, str]] = []
    with open(vmlinux, "rb") as f:
        elf = ELFFile(f)
        for s in elf.iter_sections():
            if s["sh_type"] == "SHT_PROGBITS" and s["sh_flags"] & 0x4:  # SHF_EXECINSTR
                found += [g.offset for g in scan_bytes(s.data(), s["sh_addr"])
                          if g.kind == "wrpkru"]
            elif isinstance(s, SymbolTableSection):
                funcs += [(sym["st_value"], sym.name) for sym in s.iter_symbols()
                          if sym["st_info"]["type"] == "STT_FUNC" and sym["st_value"]]
    funcs.sort()
    starts = [a for a, _ in funcs]
    out = []
    for a in sorted(found):
        i = bisect_right(starts, a) - 1
        out.append((a, f"{funcs[i][1]}+0x{a - funcs[i][0]:x}" if i >= 0 else "?"))
    return out


def available() -> str:
    """"" when gdb and pygdbmi are there, else why not."""
    import shutil

    if shutil.which("gdb") is None:
        return "no gdb on this host"
    try:
        import pygdbmi  # noqa: F401
    except ImportError:
        return "pygdbmi is not installed"
    return ""


@dataclass
class Hit:
    site: str  # function+offset
    address: int
    value: int  # EAX: the PKRU being written
    pid: int  # the task running (current)
    comm: str
    for_pid: int  # whose PKRU it is: at a context switch the next task's, else current's

    def to_dict(self) -> dict[str, Any]:
        return {"site": self.site, "address": f"0x{self.address:x}",
                "value": f"0x{self.value:x}", "pid": self.pid, "comm": self.comm,
                "for_pid": self.for_pid}


@dataclass
class WatchResult:
    sites: list[str] = field(default_factory=list)
    hits: list[Hit] = field(default_factory=list)
    error: str = ""
    skip: str = ""
    seconds: float = 0.0
    others: list[str] = field(default_factory=list)  # stops that were no breakpoint hit

    def to_dict(self) -> dict[str, Any]:
        return {"sites": self.sites, "hits": [h.to_dict() for h in self.hits],
                "error": self.error, "skip": self.skip, "seconds": round(self.seconds, 2),
                "other_stops": self.others[:50]}


def _value(resp: dict[str, Any]) -> str:
    if resp.get("message") == "error":
        raise RuntimeError(str((resp.get("payload") or {}).get("msg", "gdb error")))
    return str((resp.get("payload") or {}).get("value", ""))


class EnableWatch:
    """gdb attached to the guest's gdbstub, a breakpoint on each WRPKRU, hits recorded.

    Commands carry MI tokens and their answers are read until the result record with
    the same token; every `*stopped` notification seen on the way is queued, so that
    no breakpoint hit is lost (a lost one would leave the guest stopped)."""

    def __init__(self, run_dir: Path, vmlinux: Path, kaslr_offset: int = 0) -> None:
        self.run_dir = run_dir
        self.vmlinux = vmlinux
        self.kaslr = kaslr_offset
        self.result = WatchResult()
        self._gdb: Any = None
        self._token = 100
        self._stops: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def _take(self, resp: list[dict[str, Any]]) -> None:
        for r in resp:
            if r.get("type") == "notify" and r.get("message") == "stopped":
                self._stops.append(r)

    def _cmd(self, cmd: str, timeout: float = 10.0) -> dict[str, Any]:
        self._token += 1
        tok = self._token
        self._gdb.write(f"{tok}{cmd}", read_response=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self._gdb.get_gdb_response(timeout_sec=0.05, raise_error_on_timeout=False)
            self._take(resp)
            for r in resp:
                if r.get("type") == "result" and r.get("token") == tok:
                    return dict(r)
        raise RuntimeError(f"gdb: no answer to {cmd!r} in {timeout:g} s")

    def arm(self) -> None:
        """Attach (the guest stops), set the breakpoints, let it go on."""
        from pygdbmi.gdbcontroller import GdbController

        self._t0 = time.monotonic()
        sites = wrpkru_sites(self.vmlinux)
        self._gdb = GdbController(command=["gdb", "--nx", "--quiet", "--interpreter=mi3",
                                           str(self.vmlinux)])
        self._cmd(f"-environment-cd {self.run_dir}", 60)
        # gdb reads the vmlinux's DWARF for task_struct on first use (about 10 s): before
        # it attaches, so that the guest is not held stopped meanwhile
        for expr in ("sizeof(struct task_struct)", "&current_task",
                     "((struct task_struct *)0)->comm"):
            _value(self._cmd(f'-data-evaluate-expression "{expr}"', 180))
        r = self._cmd(f"-target-select remote {GDB_SOCKET}", 30)
        if r.get("message") != "connected":
            raise RuntimeError(f"gdb did not connect to {GDB_SOCKET}: {r}")
        for a, name in sites:
            r = self._cmd(f"-break-insert *0x{a + self.kaslr:x}")
            if r.get("message") != "done":
                raise RuntimeError(f"breakpoint at 0x{a + self.kaslr:x} ({name}) refused: {r}")
            self.result.sites.append(f"0x{a + self.kaslr:x} {name}")
        self._stops.clear()
        self._cmd("-exec-continue")
        self._thread = threading.Thread(target=self._loop, name="enable-watch", daemon=True)
        self._thread.start()

    def _hit(self) -> None:
        rip = int(_value(self._cmd('-data-evaluate-expression "(unsigned long)$pc"')), 0)
        eax = int(_value(self._cmd('-data-evaluate-expression "(unsigned int)$eax"')), 0)
        cur = "(*(struct task_struct **)((unsigned long)&current_task + $gs_base))"
        pid = int(_value(self._cmd(f'-data-evaluate-expression "{cur}->pid"')), 0)
        comm = _value(self._cmd(f'-data-evaluate-expression "{cur}->comm"'))
        site = next((s.split(" ", 1)[1] for s in self.result.sites
                     if s.startswith(f"0x{rip:x} ")), "?")
        for_pid = pid
        if site.startswith("__switch_to+"):  # x86_pkru_load(prev, next): next's PKRU
            try:
                for_pid = int(_value(self._cmd('-data-evaluate-expression "next_p->pid"')), 0)
            except (RuntimeError, ValueError):
                for_pid = -1  # not known
        name = comm.split('"')[1] if comm.count('"') >= 2 else comm
        if len(self.result.hits) < MAX_HITS:
            self.result.hits.append(Hit(site, rip, eax, pid, name.split("\\")[0], for_pid))

    def _loop(self) -> None:
        """Record each breakpoint hit and let the guest go on after every stop, whatever
        its reason: a stop left unanswered would leave the guest stopped for good."""
        while not self._stop.is_set():
            try:
                if not self._stops:
                    self._take(self._gdb.get_gdb_response(timeout_sec=0.02,
                                                          raise_error_on_timeout=False))
                    continue
                stop = self._stops.pop(0)
                reason = (stop.get("payload") or {}).get("reason", "")
                if reason == "breakpoint-hit":
                    self._hit()
                else:
                    self.result.others.append(str(reason or "stopped"))
                self._cmd("-exec-continue")
            except Exception as exc:  # noqa: BLE001 - a watch that broke: said in the row
                self.result.error = self.result.error or f"gdb: {exc}"
                try:
                    self._cmd("-exec-continue", 5)
                except Exception:  # noqa: BLE001 - disarm() detaches, which resumes too
                    return

    def disarm(self) -> WatchResult:
        """Stop watching: delete the breakpoints, detach (the guest runs on)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        if self._gdb is not None:
            try:
                self._gdb.write("-exec-interrupt", read_response=False)
                deadline = time.monotonic() + 5
                while not self._stops and time.monotonic() < deadline:
                    self._take(self._gdb.get_gdb_response(timeout_sec=0.05,
                                                          raise_error_on_timeout=False))
                self._cmd("-break-delete")
                self._cmd("-target-detach")
            except Exception as exc:  # noqa: BLE001
                self.result.error = self.result.error or f"gdb detach: {exc}"
            finally:
                try:
                    self._gdb.exit()
                except Exception:  # noqa: BLE001
                    pass
        self.result.seconds = time.monotonic() - self._t0
        return self.result


def judge_window(result: dict[str, Any] | None, pid: int | None) -> tuple[str, str]:
    """(observed, message) of row enable_window from a watch's to_dict() (pure)."""
    if result is None:
        return "error", "the host did not watch this ENABLE"
    if result.get("skip"):
        return "skip", f"not watched: {result['skip']}"
    if result.get("error"):
        return "error", f"the watch failed: {result['error']}"
    hits: Iterable[dict[str, Any]] = result.get("hits", [])
    hits = list(hits)
    mine = [h for h in hits if h.get("for_pid", h.get("pid")) == pid]
    if not mine:
        return "error", (f"no PKRU write by the enabling thread (pid {pid}) seen among "
                         f"{len(hits)} hits at {len(result.get('sites', []))} WRPKRU sites")
    opened = [h for h in hits if h.get("value") == "0x0"]
    values = ", ".join(dict.fromkeys(f"{h['value']} ({h['site']})" for h in mine))
    if opened:
        h = opened[0]
        return "open", (f"PKRU 0 (every key open) written at {h['site']} for pid "
                        f"{h.get('for_pid', h['pid'])} while pid {h['pid']} ({h['comm']}) ran; "
                        f"the enabling thread's PKRU writes: {values}")
    return "blocked", (f"never fully open: {len(hits)} PKRU writes at "
                       f"{len(result.get('sites', []))} WRPKRU sites while it enabled; the "
                       f"enabling thread's (pid {pid}): {values}")
