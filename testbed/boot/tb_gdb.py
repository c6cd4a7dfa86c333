"""gdb commands of the testbed, for a guest started with --gdb (sourced by the printed gdb
command line; runs inside gdb's own Python, so it imports nothing of the testbed).

    tb-walk ADDR [PID]   the page-table walk of ADDR in the address space of task PID (both
                         roots under PTI), or from the vCPU's CR3 without PID: each level's
                         entry and flags, the slot and its copy mark at the 512 GiB level,
                         the leaf's page and pkey

The walk is the project's own: the command runs `testbed inspect --run RUN_DIR --walk`
(testbed/snapshot/walk.py) with the testbed's Python, named with the run folder in
tb-gdb.json (written where gdb starts, the run folder). It reads guest memory only, so
the guest stays stopped where gdb holds it.
"""

import json
import os
import re
import subprocess
from typing import Any

import gdb

CONFIG = "tb-gdb.json"


def _config() -> dict[str, Any]:
    with open(CONFIG) as f:
        cfg = json.load(f)
    if not isinstance(cfg, dict):
        raise gdb.GdbError(f"{CONFIG} is not an object")
    return cfg


def _arg_value(text: str) -> int:
    """An address or pid as gdb evaluates it ($rsp, 0x7f..., a symbol)."""
    return int(gdb.parse_and_eval(text)) & ((1 << 64) - 1)


def _cr3() -> int:
    """The vCPU's CR3; QEMU's gdbstub gives it as flags ("[ PDBR=1884 PCID=0 ]")."""
    value = gdb.parse_and_eval("$cr3")
    try:
        return int(value)
    except gdb.error:
        pass
    m = re.search(r"PDBR=(\d+)", str(value))
    if m is None:
        raise gdb.GdbError(f"cannot read CR3 ({value}): give the PID")
    return int(m.group(1)) << 12


class TbWalk(gdb.Command):
    """tb-walk ADDR [PID]: the page-table walk of ADDR (the testbed's walker)."""

    def __init__(self) -> None:
        super().__init__("tb-walk", gdb.COMMAND_DATA)

    def invoke(self, argument: str, from_tty: bool) -> None:
        args = gdb.string_to_argv(argument)
        if not 1 <= len(args) <= 2:
            raise gdb.GdbError("usage: tb-walk ADDR [PID]")
        cfg = _config()
        cmd = [cfg["python"], "-m", "testbed", "inspect", "--run", cfg["run_dir"],
               "--walk", hex(_arg_value(args[0]))]
        if len(args) == 2:
            cmd += ["--pid", str(_arg_value(args[1]))]
        else:
            cmd += ["--cr3", hex(_cr3())]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (cfg["source_root"], env.get("PYTHONPATH", "")) if p)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
        gdb.write(res.stdout)
        if res.returncode != 0:
            raise gdb.GdbError(res.stderr.strip() or f"tb-walk: exit status {res.returncode}")


TbWalk()
