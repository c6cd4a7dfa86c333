"""`testbed kernel build`, `list`, `remove` and `prune`."""

from __future__ import annotations

import argparse
import json

from testbed.build.kernel import (
    build_kernel,
    list_cached,
    plan_kernel,
    prune_plan,
    remove_build,
)
from testbed.errors import BuildError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    kernel = subparsers.add_parser("kernel", help="build and list patched kernels")
    ksub = kernel.add_subparsers(dest="kernel_command", required=True, metavar="ACTION")

    build = ksub.add_parser(
        "build",
        help="apply a series to a base tree and build bzImage + vmlinux (cached)",
        description="Apply a patch series to a base kernel tree, configure it from "
        "kernel-patches/base.config plus fragments, and build bzImage and vmlinux "
        "(DWARF + BTF). Results are cached by content hash.",
    )
    _build_inputs(build)
    build.add_argument("-j", "--jobs", type=int, default=None, help="make -j (default: all CPUs)")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--json", action="store_true", help="print the result as JSON")
    build.set_defaults(func=_cmd_build)

    key = ksub.add_parser(
        "key", help="print the cache key of a build without building (for CI caches)",
        description="Print the content hash `testbed kernel build` would file the build "
        "under (base tree, series, config fragments, toolchain versions), and build "
        "nothing. CI keys its kernel cache (~/.cache/testbed/kernels/KEY) with it.",
    )
    _build_inputs(key)
    key.add_argument("--json", action="store_true",
                     help="print key, cached (true/false), folder, series and base as JSON")
    key.set_defaults(func=_cmd_key)

    lst = ksub.add_parser("list", help="show cached kernel builds")
    lst.add_argument("--json", action="store_true", help="print as JSON")
    lst.set_defaults(func=_cmd_list)

    rm = ksub.add_parser("remove", help="delete cached kernel builds by key")
    rm.add_argument("keys", nargs="+", metavar="KEY", help="build keys (or unique prefixes)")
    rm.set_defaults(func=_cmd_remove)

    prune = ksub.add_parser(
        "prune", help="delete all but the newest cached builds of each series",
        description="Delete cached kernel builds, keeping the --keep newest of each series "
        "(builds without a series count as one). A guest running a deleted kernel keeps "
        "running, but snapshots need its vmlinux: prune between runs.",
    )
    prune.add_argument("--keep", type=int, default=2, metavar="N",
                       help="builds to keep per series (default 2)")
    prune.add_argument("--dry-run", action="store_true", help="only say what would go")
    prune.set_defaults(func=_cmd_prune)


def _build_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--series", metavar="NAME|DIR|MBOX",
                   help="kernel-patches/<NAME>, a quilt folder with a 'series' file, "
                   "an mbox (b4 am output or lore t.mbox.gz) or a single patch")
    p.add_argument("--config", metavar="FRAGMENT", nargs="+", action="extend", default=[],
                   help="config fragment file(s), names under kernel-patches/, or inline "
                   "CONFIG_X=value; applied after base.config")
    p.add_argument("--source", metavar="TREE|TARBALL",
                   help="base tree: a git tree or a tarball "
                   "(default: Debian's /usr/src/linux-source-6.1.tar.xz)")


def _cmd_key(args: argparse.Namespace) -> int:
    plan = plan_kernel(series=args.series, config_fragments=args.config, source=args.source)
    if args.json:
        print(json.dumps({"key": plan.key, "cached": plan.cached, "dir": str(plan.dir),
                          "series": plan.series.name, "base": plan.base.label,
                          "toolchain": plan.toolchain}, indent=2))
    else:
        print(plan.key)
    return 0


def _cmd_build(args: argparse.Namespace) -> int:
    kb = build_kernel(series=args.series, config_fragments=args.config, source=args.source,
                      jobs=args.jobs, force=args.force)
    if args.json:
        print(json.dumps({"key": kb.key, "bzimage": str(kb.bzimage), "vmlinux": str(kb.vmlinux),
                          "config": str(kb.config), "system_map": str(kb.system_map),
                          "build_log": str(kb.build_log), "base_version": kb.base_version,
                          "kernel_release": kb.kernel_release, "series": kb.series,
                          "cached": kb.cached, "seconds": round(kb.seconds, 1)}, indent=2))
        return 0
    how = "cached" if kb.cached else f"built in {kb.seconds:.0f}s"
    print(f"key:      {kb.key} ({how})")
    print(f"bzImage:  {kb.bzimage}")
    print(f"vmlinux:  {kb.vmlinux}")
    print(f"config:   {kb.config}")
    print(f"base:     {kb.base_version}")
    print(f"release:  {kb.kernel_release}")
    if kb.series:
        print(f"series:   {kb.series}")
    return 0


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _cmd_list(args: argparse.Namespace) -> int:
    rows = list_cached()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no cached kernel builds")
        return 0
    print(f"{'KEY':<24}  {'DATE':<19}  {'SIZE':>9}  {'SERIES':<16}  BASE")
    for r in rows:
        print(f"{r['key']:<24}  {r['date'][:19]:<19}  {_human(r['size']):>9}  "
              f"{r['series'][:16]:<16}  {r['base_version']}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    for key in args.keys:
        print(f"removed {remove_build(key)}")
    return 0


def _cmd_prune(args: argparse.Namespace) -> int:
    if args.keep < 0:
        raise BuildError(f"--keep {args.keep}: give 0 or more builds to keep per series")
    drop = prune_plan(list_cached(), args.keep)
    verb = "would remove" if args.dry_run else "removed"
    for r in drop:
        if not args.dry_run:
            remove_build(r["key"])
        print(f"{verb} {r['key']}  {r['date'][:19]}  {_human(r['size']):>9}  {r['series']}")
    total = _human(sum(r["size"] for r in drop))
    print(f"{verb} {len(drop)} build(s), {total}" if drop else "nothing to remove")
    return 0
