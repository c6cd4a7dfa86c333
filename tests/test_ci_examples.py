"""The CI examples parse (PyYAML) and run what this testbed offers: shards that cover
every runner's index, `testbed kernel key` for the cache, `report merge` of the shards;
each testbed command line they use parses with the real parser."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from testbed.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent / "ci-examples"


def _testbed_commands(script: str, subst: dict[str, str]) -> list[list[str]]:
    """The `testbed ...` command lines in a shell script, with CI expressions replaced."""
    out = []
    for line in script.replace("\\\n", " ").splitlines():
        for k, v in subst.items():
            line = line.replace(k, v)
        m = re.search(r"\.venv/bin/testbed (.*)", line)
        if not m:
            continue
        text = re.sub(r"\$\(cat [^)]*\)", "0e1d8e2bb868", m.group(1))
        text = text.split("|")[0].split(')"')[0]  # the end of a $(...) around it
        text = text.replace("$ACCEL", "auto")
        text = re.sub(r"\$\{?\w+\}?", "x", text)
        out.append(shlex.split(text))
    return out


def _check_parses(cmd: list[str]) -> None:
    args = build_parser().parse_args(cmd)
    assert callable(args.func), cmd


def _steps_text(job: dict[str, Any]) -> str:
    return "\n".join(str(s.get("run", "")) for s in job.get("steps", []))


def test_github_workflow() -> None:
    doc = yaml.safe_load((ROOT / "github/workflows/testbed.yml").read_text())
    jobs = doc["jobs"]
    assert set(jobs) == {"kernel", "run", "merge"}
    # the kernel cache is keyed by `testbed kernel key`
    key_step = next(s for s in jobs["kernel"]["steps"] if s.get("id") == "key")
    assert "testbed kernel key" in key_step["run"]
    cache = next(s for s in jobs["kernel"]["steps"] if s.get("uses", "").startswith(
        "actions/cache@"))
    assert "steps.key.outputs.key" in cache["with"]["key"]
    assert jobs["kernel"]["outputs"]["key"] == "${{ steps.key.outputs.key }}"
    # a matrix of shards, each one --shard I/N with N the matrix's size
    shards = jobs["run"]["strategy"]["matrix"]["shard"]
    n = len(shards)
    assert shards == list(range(1, n + 1))
    run_text = _steps_text(jobs["run"])
    assert f"--shard ${{{{ matrix.shard }}}}/{n}" in run_text
    assert "/dev/kvm" in run_text and "pku" in run_text  # KVM only where it can work
    assert jobs["run"]["needs"] == "kernel" and jobs["merge"]["needs"] == "run"
    assert "testbed report merge" in _steps_text(jobs["merge"])
    cmds = []
    for job in jobs.values():
        cmds += _testbed_commands(_steps_text(job), {
            "${{ matrix.shard }}": "1", "${{ needs.kernel.outputs.key }}": "0e1d8e2bb868"})
    assert {c[0] for c in cmds} >= {"kernel", "run", "report"}
    for c in cmds:
        _check_parses(c)


def test_gitlab_ci() -> None:
    doc = yaml.safe_load((ROOT / "gitlab/.gitlab-ci.yml").read_text())
    assert doc["stages"] == ["kernel", "run", "merge"]
    run = doc["run"]
    assert isinstance(run["parallel"], int) and run["parallel"] > 1
    script = "\n".join(run["script"][1:] if isinstance(run["script"][0], list)
                       else run["script"])
    assert '--shard "$CI_NODE_INDEX/$CI_NODE_TOTAL"' in script
    assert "/dev/kvm" in script and "pku" in script
    assert "testbed kernel key" in "\n".join(map(str, doc["kernel"]["script"]))
    assert "testbed report merge" in "\n".join(map(str, doc["merge"]["script"]))
    cmds = []
    for name in ("kernel", "run", "merge"):
        lines = []
        for item in doc[name]["script"]:
            lines += item if isinstance(item, list) else [item]
        cmds += _testbed_commands("\n".join(lines), {})
    assert {c[0] for c in cmds} >= {"kernel", "run", "report"}
    for c in cmds:
        _check_parses(c)
