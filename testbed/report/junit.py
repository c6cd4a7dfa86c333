"""JUnit XML for CI: one <testsuite> per scenario, one <testcase> per (check, checkpoint, subject).

Testcase name `check[checkpoint] subject`, classname `scenario.source.check` (CI UIs group by
class), where source is `host` (judged from snapshots), `guest` (a guest program's verdict) or
`host+guest`.
A failing case has <failure message=... type=check> whose text is the message and the evidence;
an error finding, or a scenario that could not run (testcase "scenario"), has <error>; a case
whose findings are all skips has <skipped message=...>. The suite's <system-out> names the
scenario's evidence files (console log, snapshots, findings, reproduce.sh), then holds the
console tail of a scenario that did not pass and the guest output. Counts: `skipped` on
each <testsuite> (the Jenkins/Ant schema has none on
<testsuites>).

This is the one report not rendered with jinja2: XML needs attribute and text escaping (and
characters XML 1.0 forbids removed) that xml.etree.ElementTree does right, so it is built as a
tree instead of being templated.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from testbed.check.model import ScenarioResult

from .common import Case, RunMeta, cases, pretty_evidence, totals

# XML 1.0 allows tab, LF, CR and everything from 0x20 except surrogates and U+FFFE/U+FFFF.
# Guest console output has ESC (colours) and sometimes NUL; ElementTree would write them as
# they are and produce a file no parser accepts.
_FORBIDDEN = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_safe(text: str) -> str:
    """`text` with the characters XML 1.0 cannot carry shown as \\xNN."""
    return _FORBIDDEN.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _case_text(case: Case) -> str:
    parts = []
    for f in case.findings:
        if not f.bad:
            continue
        parts.append(f"{f.status.value.upper()} ({f.source}): {f.message}")
        if f.evidence:
            parts.append(pretty_evidence(f.evidence))
    if case.error_text:
        parts.append(case.error_text)
    return xml_safe("\n".join(parts))


def _properties(parent: ET.Element, props: dict[str, str]) -> None:
    props = {k: v for k, v in props.items() if v}
    if not props:
        return
    el = ET.SubElement(parent, "properties")
    for k, v in props.items():
        ET.SubElement(el, "property", name=xml_safe(k), value=xml_safe(v))


def system_out(r: ScenarioResult) -> str:
    """A suite's <system-out>: the evidence files, the console tail (a scenario that did
    not pass), then the workloads' output."""
    parts = []
    if r.evidence:
        parts.append("".join(f"{name}: {path}\n" for name, path in r.evidence.items()))
    if r.console_tail:
        parts.append("--- console tail ---\n" + r.console_tail.rstrip("\n") + "\n")
    if r.output:
        parts.append(("--- guest output ---\n" if parts else "") + r.output)
    return "\n".join(parts)


def junit_tree(results: Sequence[ScenarioResult], meta: RunMeta | None = None) -> ET.Element:
    meta = meta or RunMeta()
    t = totals(results)
    root = ET.Element(
        "testsuites",
        name="testbed",
        tests=str(t.tests),
        failures=str(t.failures),
        errors=str(t.errors),
        time=f"{meta.seconds or t.seconds:.3f}",
    )
    for r in results:
        cs = cases(r)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=xml_safe(r.scenario),
            tests=str(len(cs)),
            failures=str(sum(c.status == "fail" for c in cs)),
            errors=str(sum(c.status == "error" for c in cs)),
            skipped=str(sum(c.status == "skip" for c in cs)),
            time=f"{r.seconds:.3f}",
        )
        if meta.started:
            suite.set("timestamp", meta.started)
        _properties(
            suite,
            {
                "kernel": meta.kernel,
                "osrelease": meta.osrelease,
                "accel": meta.accel,
                "bugs": ",".join(r.bugs or meta.bugs),
                "run_dir": r.run_dir,
            },
        )
        for c in cs:
            case = ET.SubElement(
                suite,
                "testcase",
                name=xml_safe(c.name),
                classname=xml_safe(f"{r.scenario}.{c.source}.{c.check}"),
                time=f"{r.seconds:.3f}" if c.error_text else "0.000",
            )
            if c.status == "pass":
                continue
            if c.status == "skip":
                ET.SubElement(case, "skipped", message=xml_safe(" ".join(c.message.split())))
                continue
            el = ET.SubElement(
                case,
                "error" if c.status == "error" else "failure",
                message=xml_safe(" ".join(c.message.split())),
                type=xml_safe(c.check),
            )
            el.text = _case_text(c)
        out = system_out(r)
        if out:
            ET.SubElement(suite, "system-out").text = xml_safe(out)
    return root


def render_junit(results: Sequence[ScenarioResult], meta: RunMeta | None = None) -> str:
    root = junit_tree(results, meta)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(
    results: Sequence[ScenarioResult], path: str | Path, meta: RunMeta | None = None
) -> Path:
    p = Path(path)
    p.write_text(render_junit(results, meta), encoding="utf-8")
    return p
