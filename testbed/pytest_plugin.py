"""pytest integration: RPAL scenarios and checks as pytest items, with `guest` and `snapshot`.

Loaded through the `pytest11` entry point when the testbed is installed.
Fixtures (`pytest --fixtures` shows each one's docstring):
  rpal_kernel          the kernel under test: --testbed-kernel, $TESTBED_KERNEL (a bzImage
                       with vmlinux or System.map beside it, or a cached build's key), else
                       the rpal-ref reference kernel, built or from the cache (session)
  guest_spec           kernel + image + accelerator for guests (session)
  testbed_runs         the parent of this session's guest folders (session)
  guest                a booted guest (a testbed Machine); @pytest.mark.rpal_bug("name", ...)
                       injects bugs, @pytest.mark.guest_options(smp=, mem=, paging=, pti=,
                       append=) shapes the guest
  snapshot             a function: snapshot() -> Snapshot, the guest as the host sees it now
  checkpoint_snapshots {checkpoint name: Snapshot}, filled at each guest checkpoint
  scenario_result      a function: scenario_result("pair", bugs=()) -> ScenarioResult, run
                       once per (scenario, bugs) and session
A bug name the design does not know in an rpal_bug marker is a collection error. Guest
folders go under $TESTBED_RUNS (else pytest's temporary folder), one folder per pytest-xdist
worker (`pytest -n N`), so the workers' guests stay apart. A failed test that used a guest
names the guest's folder and shows its console tail. A CI pipeline selects with -k (e.g.
`-k "phases and slot_copies"`) and gets JUnit from pytest itself (`--junitxml`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

GUEST_OPTIONS = ("smp", "mem", "paging", "pti", "append")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("testbed")
    group.addoption("--testbed-kernel", metavar="PATH|KEY", default=None,
                    help="kernel under test for the testbed fixtures (a bzImage or a cached "
                         "build's key; default $TESTBED_KERNEL, else the reference kernel)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rpal_bug(*names): boot the guest with these injected "
                            "bugs (names of `testbed list`; a wrong name fails collection)")
    config.addinivalue_line("markers", "guest_options(smp=2, mem=512, paging=5, pti='auto', "
                            "append=''): the guest fixture's machine")


def _bad_bugs(names: tuple[Any, ...]) -> str:
    """Why the marker's names are wrong ("" when they are all known bugs)."""
    import difflib

    from testbed.designs import get_design

    known = get_design().bugs
    bad = [n for n in names if not isinstance(n, str) or n not in known]
    if not bad:
        return ""
    hints = []
    for n in bad:
        close = difflib.get_close_matches(str(n), known, n=1)
        hints.append(f"{n!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return (f"rpal_bug: unknown bug {', '.join(hints)}; the bugs are: {', '.join(known)}")


def _bad_options(kwargs: dict[str, Any]) -> str:
    unknown = sorted(set(kwargs) - set(GUEST_OPTIONS))
    if unknown:
        return (f"guest_options: unknown option {', '.join(unknown)}; choose from "
                f"{', '.join(GUEST_OPTIONS)}")
    return ""


@pytest.hookimpl(wrapper=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object
                              ) -> Generator[None, Any, Any]:
    """A misspelt bug name must not test the correct kernel and pass: the module fails to
    collect, naming the marker, the test and the closest bug."""
    items = yield
    for item in items if isinstance(items, list) else [items] if items is not None else []:
        if not isinstance(item, pytest.Item):
            continue
        for mark in item.iter_markers("rpal_bug"):
            why = _bad_bugs(tuple(mark.args))
            if why:
                raise collector.CollectError(f"{item.name}: {why}")
        for mark in item.iter_markers("guest_options"):
            why = _bad_options(dict(mark.kwargs))
            if why:
                raise collector.CollectError(f"{item.name}: {why}")
    return items


@pytest.fixture(scope="session")
def rpal_kernel(pytestconfig: pytest.Config) -> Path:
    """The kernel under test (a bzImage path): --testbed-kernel, else $TESTBED_KERNEL, else
    the design's reference kernel (rpal-ref), built once or taken from the cache."""
    from testbed.boot.kernelimage import resolve_kernel

    chosen = pytestconfig.getoption("testbed_kernel") or os.environ.get("TESTBED_KERNEL")
    if chosen:
        return resolve_kernel(chosen)
    from testbed.build.kernel import build_kernel
    from testbed.designs import get_design

    return build_kernel(series=get_design().kernel_series).bzimage


@pytest.fixture(scope="session")
def guest_spec(rpal_kernel: Path) -> Any:
    """What every guest boots (a testbed.runner.GuestSpec): the kernel, the initramfs built
    for it, and the accelerator (KVM where it works with PKU, else TCG)."""
    from testbed.boot.kernelimage import inspect_kernel
    from testbed.boot.machine import resolve_accel
    from testbed.build.initramfs import ImageSpec, build_image
    from testbed.runner import GuestSpec

    image = build_image(ImageSpec(kernel=inspect_kernel(rpal_kernel)))
    accel = resolve_accel("auto", 5, rpal_kernel, image.path)
    return GuestSpec(kernel=rpal_kernel, initrd=image.path, accel=accel)


def runs_parent(tmp_factory: pytest.TempPathFactory | None = None) -> Path:
    """The parent of this process's guest folders: $TESTBED_RUNS/pytest-WORKER when set (a
    folder of its own per pytest-xdist worker), else pytest's temporary folder."""
    from testbed import paths

    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    if os.environ.get("TESTBED_RUNS"):
        d = paths.runs_dir() / f"pytest-{worker}"
        d.mkdir(parents=True, exist_ok=True)
        return paths.new_run_dir("session", d)
    assert tmp_factory is not None
    return tmp_factory.mktemp(f"testbed-runs-{worker}")


@pytest.fixture(scope="session")
def testbed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The parent folder of this session's guest folders: under $TESTBED_RUNS when set
    (`pytest-WORKER/`: each pytest-xdist worker its own), else pytest's temporary folder."""
    return runs_parent(tmp_path_factory)


def guest_config(node: Any, spec: Any) -> Any:
    """The MachineConfig of the `guest` fixture for a test: the spec, the rpal_bug marker's
    bugs (the design's bug parameter first on the command line) and guest_options."""
    from testbed.boot.machine import MachineConfig
    from testbed.designs import get_design

    marker = node.get_closest_marker("rpal_bug")
    bugs = tuple(marker.args) if marker else ()
    why = _bad_bugs(bugs)
    if why:
        raise pytest.UsageError(why)
    opts = dict(node.get_closest_marker("guest_options").kwargs
                if node.get_closest_marker("guest_options") else {})
    why = _bad_options(opts)
    if why:
        raise pytest.UsageError(why)
    append = " ".join(x for x in (get_design().bug_append(bugs), opts.get("append", "")) if x)
    if opts.get("append"):
        from testbed.runner import check_append

        check_append(opts["append"])
    return MachineConfig(
        kernel=spec.kernel, initrd=spec.initrd, accel=spec.accel,
        smp=int(opts.get("smp", 2)), mem_mib=int(opts.get("mem", spec.mem_mib)),
        paging=int(opts.get("paging", 5)), pti=str(opts.get("pti", "auto")), append=append,
    )


@pytest.fixture
def guest(request: pytest.FixtureRequest, guest_spec: Any, testbed_runs: Path) -> Iterator[Any]:
    """A booted guest (testbed.boot.machine.Machine) of its own for this test, stopped after
    it: `guest.run("cmd")`. Markers: rpal_bug("name", ...) injects bugs; guest_options(smp=,
    mem=, paging=, pti=, append=) shapes the machine. A failure report names its folder."""
    from testbed import paths
    from testbed.boot.machine import Machine

    cfg = guest_config(request.node, guest_spec)
    with Machine(cfg, paths.new_run_dir("pytest", testbed_runs)) as m:
        yield m


@pytest.fixture
def snapshot(guest: Any, guest_spec: Any) -> Iterator[Callable[..., Any]]:
    """A function: snapshot(name="pytest") -> testbed.snapshot.model.Snapshot, the guest as
    the host reads it now (vCPUs, tasks, page tables, TLB state)."""
    from testbed.snapshot.live import LiveSnapshotter

    snapper = LiveSnapshotter(guest.qmp, guest.ram_path, guest_spec.kernel)
    yield lambda name="pytest": snapper.capture(name)
    snapper.close()


@pytest.fixture
def checkpoint_snapshots(guest: Any, guest_spec: Any) -> Iterator[dict[str, Any]]:
    """{checkpoint name: Snapshot}, filled as the guest's programs stop at checkpoints
    (tb-checkpoint NAME, tb_checkpoint_facts()) while the test runs commands in `guest`."""
    from testbed.snapshot.live import LiveSnapshotter
    from testbed.snapshot.model import Trigger

    snapper = LiveSnapshotter(guest.qmp, guest.ram_path, guest_spec.kernel)
    taken: dict[str, Any] = {}

    def on_checkpoint(ck: Any) -> None:
        taken[ck.name] = snapper.capture(ck.name, Trigger(ck.name, ck.pid, ck.tid,
                                                          dict(ck.facts)))

    guest.on_checkpoint = on_checkpoint
    yield taken
    guest.on_checkpoint = None
    snapper.close()


_results: dict[tuple[str, tuple[str, ...]], Any] = {}


@pytest.fixture(scope="session")
def scenario_result(guest_spec: Any, testbed_runs: Path) -> Callable[..., Any]:
    """A function: scenario_result("pair", bugs=()) -> ScenarioResult, the scenario run as
    `testbed run` runs it (snapshots, checks), once per (scenario, bugs) and session."""
    from testbed.designs import get_design
    from testbed.runner import run_scenario

    design = get_design()

    def get(name: str, bugs: tuple[str, ...] = ()) -> Any:
        design.check_bugs(bugs)
        key = (name, tuple(bugs))
        if key not in _results:
            _results[key] = run_scenario(design.scenarios[name], guest_spec, tuple(bugs),
                                         testbed_runs)
        return _results[key]

    return get


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test that used a guest names the guest's folder and its console tail."""
    report = yield
    if report.failed:
        m = getattr(item, "funcargs", {}).get("guest")
        if m is not None and getattr(m, "run_dir", None) is not None:
            from testbed.runner import console_tail

            text = f"guest folder: {m.run_dir}\n"
            console = getattr(m, "console_log", None)
            if console is not None:
                tail = console_tail(Path(console), 30)
                text += f"console log: {console}\n" + (
                    f"console tail:\n{tail}" if tail else "console: empty\n")
            report.sections.append(("testbed guest", text))
    return report
