"""pytest integration: RPAL scenarios and checks as pytest items, with `guest` and `snapshot`.

Loaded through the `pytest11` entry point when the testbed is installed.
Fixtures:
  rpal_kernel     the kernel under test: $TESTBED_KERNEL (a bzImage with vmlinux or
                  System.map beside it), else the rpal-ref reference kernel, built
                  or taken from the cache (session scope)
  guest_spec      kernel + image + accelerator for guests (session scope)
  guest           a booted guest (a testbed Machine) on that kernel; inject bugs with
                  @pytest.mark.rpal_bug("name", ...)
  snapshot        a function: snapshot() -> Snapshot, the guest as the host sees it now
  scenario_result a function: scenario_result("pair", bugs=()) -> ScenarioResult, run
                  once per (scenario, bugs) and session
A CI pipeline selects with -k (e.g. `-k "phases and slot_copies"`) and gets
JUnit from pytest itself (`--junitxml`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "rpal_bug(*names): boot the guest with these bugs")


@pytest.fixture(scope="session")
def rpal_kernel() -> Path:
    env = os.environ.get("TESTBED_KERNEL")
    if env:
        return Path(env)
    from testbed.build.kernel import build_kernel
    from testbed.designs import get_design

    return build_kernel(series=get_design().kernel_series).bzimage


@pytest.fixture(scope="session")
def guest_spec(rpal_kernel: Path) -> Any:
    from testbed.boot.kernelimage import inspect_kernel
    from testbed.boot.machine import resolve_accel
    from testbed.build.initramfs import ImageSpec, build_image
    from testbed.runner import GuestSpec

    image = build_image(ImageSpec(kernel=inspect_kernel(rpal_kernel)))
    accel = resolve_accel("auto", 5, rpal_kernel, image.path)
    return GuestSpec(kernel=rpal_kernel, initrd=image.path, accel=accel)


@pytest.fixture(scope="session")
def testbed_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("testbed-runs")


@pytest.fixture
def guest(request: pytest.FixtureRequest, guest_spec: Any, testbed_runs: Path) -> Iterator[Any]:
    from testbed import paths
    from testbed.boot.machine import Machine, MachineConfig
    from testbed.designs import get_design

    marker = request.node.get_closest_marker("rpal_bug")
    bugs = tuple(marker.args) if marker else ()
    cfg = MachineConfig(
        kernel=guest_spec.kernel, initrd=guest_spec.initrd, accel=guest_spec.accel,
        append=get_design().bug_append(bugs),
    )
    with Machine(cfg, paths.new_run_dir("pytest", testbed_runs)) as m:
        yield m


@pytest.fixture
def snapshot(guest: Any, guest_spec: Any) -> Iterator[Callable[..., Any]]:
    from testbed.snapshot.live import LiveSnapshotter

    snapper = LiveSnapshotter(guest.qmp, guest.ram_path, guest_spec.kernel)
    yield lambda name="pytest": snapper.capture(name)
    snapper.close()


_results: dict[tuple[str, tuple[str, ...]], Any] = {}


@pytest.fixture(scope="session")
def scenario_result(guest_spec: Any, testbed_runs: Path) -> Callable[..., Any]:
    from testbed.designs import get_design
    from testbed.runner import run_scenario

    scenarios = get_design().scenarios

    def get(name: str, bugs: tuple[str, ...] = ()) -> Any:
        key = (name, tuple(bugs))
        if key not in _results:
            _results[key] = run_scenario(scenarios[name], guest_spec, tuple(bugs), testbed_runs)
        return _results[key]

    return get
