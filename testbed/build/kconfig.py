"""Kernel config fragments: load them, merge them, and check that every request stuck.

Merging uses the kernel's own ``scripts/kconfig/merge_config.sh`` (kept in the
tree it configures, so it always matches the Kconfig language of that tree):
the ``make tinyconfig`` output is the first fragment, then ``base.config``,
then the series' ``config`` and the user's fragments, later ones winning;
merge_config.sh then runs ``make alldefconfig`` with the merged file as
``KCONFIG_ALLCONFIG``, which keeps every listed value and gives every other
symbol its Kconfig default (as ``olddefconfig`` would), and finally prints
"Value requested for CONFIG_X not in final .config" for each value that did not
survive. We parse those lines, and re-check every requested option ourselves
against the final ``.config`` (the two must agree; the Python check is the
one that decides). For an option that did not stick we name the unmet part of
its ``depends on`` (read from the tree's Kconfig files, following ``source``,
``if`` and ``menu`` nesting), or the symbols that ``select`` it.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.errors import BuildError
from testbed.paths import PATCHES_DIR

BASE_FRAGMENT = PATCHES_DIR / "base.config"

_SET_RE = re.compile(r"^(CONFIG_[A-Za-z0-9_]+)=(.*)$")
_UNSET_RE = re.compile(r"^# (CONFIG_[A-Za-z0-9_]+) is not set\s*$")


@dataclass(frozen=True)
class Fragment:
    name: str
    text: str

    def options(self) -> dict[str, str]:
        return parse_config(self.text)


def parse_config(text: str) -> dict[str, str]:
    """CONFIG_X -> value ("y", "m", "n" for "is not set", or the literal after '=')."""
    values: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        m = _SET_RE.match(line)
        if m:
            values[m.group(1)] = m.group(2).strip()
            continue
        m = _UNSET_RE.match(line)
        if m:
            values[m.group(1)] = "n"
    return values


def validate_fragment(fragment: Fragment) -> None:
    for lineno, raw in enumerate(fragment.text.splitlines(), 1):
        line = raw.strip()
        if not line or _SET_RE.match(line) or _UNSET_RE.match(line) or line.startswith("#"):
            continue
        raise BuildError(f"malformed config fragment {fragment.name}:{lineno}: {line!r} "
                         "(expected CONFIG_X=value or '# CONFIG_X is not set')")


def load_fragment(spec: str | os.PathLike[str], *, patches_dir: Path = PATCHES_DIR) -> Fragment:
    """A fragment from a path, a name under kernel-patches/ (with or without .config),
    or an inline option such as ``CONFIG_RPAL=y`` / ``CONFIG_FOO=n``."""
    text = str(spec)
    m = re.fullmatch(r"(CONFIG_[A-Za-z0-9_]+)=(.*)", text.strip())
    if m and not Path(text).exists():
        value = m.group(2)
        line = f"# {m.group(1)} is not set" if value == "n" else text.strip()
        frag = Fragment(name=text.strip(), text=line + "\n")
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            for cand in (patches_dir / text, patches_dir / f"{text}.config"):
                if cand.is_file():
                    path = cand
                    break
            else:
                raise BuildError(f"config fragment not found: {spec}")
        frag = Fragment(name=str(path), text=path.read_text(errors="replace"))
    validate_fragment(frag)
    return frag


def requested_options(fragments: Sequence[Fragment]) -> dict[str, tuple[str, str]]:
    """CONFIG_X -> (value, fragment name); a later fragment overrides an earlier one."""
    req: dict[str, tuple[str, str]] = {}
    for frag in fragments:
        for sym, val in frag.options().items():
            req[sym] = (val, frag.name)
    return req


@dataclass(frozen=True)
class Mismatch:
    symbol: str  # CONFIG_X
    requested: str
    actual: str  # "n" when absent
    fragment: str


def _norm(value: str) -> str:
    return value.strip()


def check_config(
    requested: Mapping[str, tuple[str, str]], final: Mapping[str, str]
) -> list[Mismatch]:
    """Every requested option whose value is not the one in the final .config."""
    out: list[Mismatch] = []
    for sym, (want, frag) in requested.items():
        have = final.get(sym, "n")
        if _norm(want) != _norm(have):
            out.append(Mismatch(symbol=sym, requested=want, actual=have, fragment=frag))
    return out


_MC_RE = re.compile(r"^Value requested for (CONFIG_[A-Za-z0-9_]+) not in final \.config$", re.M)


def parse_merge_config_output(text: str) -> list[tuple[str, str, str]]:
    """(symbol, requested line, actual line) from merge_config.sh's report."""
    out: list[tuple[str, str, str]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _MC_RE.match(line.strip())
        if not m:
            continue
        req = act = ""
        for follow in lines[i + 1:i + 3]:
            if follow.startswith("Requested value:"):
                req = follow.split(":", 1)[1].strip()
            elif follow.startswith("Actual value:"):
                act = follow.split(":", 1)[1].strip()
        out.append((m.group(1), req, act))
    return out


# --------------------------------------------------------------------------- Kconfig reading


@dataclass
class SymbolDef:
    name: str
    file: str
    depends: list[str] = field(default_factory=list)  # conjuncts, outer context first
    has_prompt: bool = False


@dataclass
class KconfigIndex:
    """Definitions and reverse selects of Kconfig symbols, enough to explain a value."""

    defs: dict[str, list[SymbolDef]] = field(default_factory=dict)
    selected_by: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # sym->(by, cond)

    @classmethod
    def load(cls, srctree: Path, arch: str = "x86", top: str = "Kconfig") -> KconfigIndex:
        idx = cls()
        macros = {"SRCARCH": arch, "ARCH": arch, "HEADER_ARCH": arch}
        idx._parse(srctree, srctree / top, [], macros, depth=0)
        return idx

    def _parse(self, srctree: Path, path: Path, context: list[str], macros: dict[str, str],
               depth: int) -> None:
        if depth > 40 or not path.is_file():
            return
        rel = str(path.relative_to(srctree)) if path.is_relative_to(srctree) else str(path)
        lines = _logical_lines(path.read_text(errors="replace"))
        stack: list[tuple[str, int]] = []  # (kind, number of conditions pushed)
        ctx = list(context)
        current: SymbolDef | None = None
        pending: str | None = None  # "menu"/"choice" collecting its own depends
        for line in lines:
            words = line.split(None, 1)
            if not words:
                continue
            kw, rest = words[0], (words[1].strip() if len(words) > 1 else "")
            if kw in ("config", "menuconfig"):
                current = SymbolDef(name=rest.split()[0], file=rel, depends=list(ctx))
                self.defs.setdefault(current.name, []).append(current)
                pending = None
            elif kw in ("bool", "tristate", "string", "hex", "int", "prompt", "def_bool",
                        "def_tristate") and current is not None:
                if kw == "prompt" or (kw in ("bool", "tristate", "string", "hex", "int")
                                      and rest.startswith('"')):
                    current.has_prompt = True
            elif kw == "depends" and rest.startswith("on"):
                expr = " ".join(rest[2:].split())
                if pending is not None:
                    ctx.append(expr)
                    if stack:
                        kind, n = stack[-1]
                        stack[-1] = (kind, n + 1)
                elif current is not None:
                    current.depends.append(expr)
            elif kw == "select" and current is not None:
                target, _, cond = rest.partition(" if ")
                self.selected_by.setdefault(target.strip(), []).append(
                    (current.name, cond.strip()))
            elif kw in ("menu", "choice"):
                current = None
                stack.append((kw, 0))
                pending = kw
            elif kw == "if":
                current, pending = None, None
                ctx.append(rest)
                stack.append(("if", 1))
            elif kw in ("endmenu", "endchoice", "endif"):
                current, pending = None, None
                if stack:
                    _, n = stack.pop()
                    if n:
                        del ctx[-n:]
            elif kw in ("source", "rsource", "osource", "orsource"):
                current, pending = None, None
                target = _expand(rest.strip().strip('"'), macros)
                base = path.parent if kw.startswith(("r", "or")) else srctree
                pattern = str(base / target)
                for sub in sorted(glob.glob(pattern)) if "*" in pattern else [pattern]:
                    self._parse(srctree, Path(sub), ctx, macros, depth + 1)
            elif kw in ("comment", "mainmenu"):
                current = None
                pending = None
            elif kw in ("help", "---help---"):
                pass

    # ---- explaining a value

    def explain(self, symbol: str, requested: str, final: Mapping[str, str]) -> str:
        name = symbol.removeprefix("CONFIG_")
        defs = self.defs.get(name)
        if not defs:
            return "no such option in this tree's Kconfig"
        if requested in ("n", "") and final.get(symbol, "n") != "n":
            sel = [by for by, cond in self.selected_by.get(name, [])
                   if final.get(f"CONFIG_{by}", "n") != "n"
                   and (not cond or evaluate(cond, final) > 0)]
            return f"selected by {', '.join(sorted(set(sel)))}" if sel else "forced by a default"
        for d in defs:
            unmet = [e for e in d.depends if evaluate(e, final) == 0]
            if unmet:
                expr = " && ".join(_paren(e) for e in unmet) if len(unmet) > 1 else unmet[0]
                return f"unmet dependency {expr} ({d.file})"
            if requested == "m" and any(evaluate(e, final) == 1 for e in d.depends):
                continue
        if requested == "m":
            return "cannot be a module here (bool, or a dependency is built in only as y/n)"
        if not any(d.has_prompt for d in defs):
            sels = sorted({by for by, _ in self.selected_by.get(name, [])})
            hint = f"; selected by {', '.join(sels[:6])}" if sels else ""
            return f"has no prompt, it can only be selected{hint}"
        return f"dependencies met but value changed ({defs[0].file})"


def _paren(expr: str) -> str:
    return f"({expr})" if ("||" in expr and not expr.startswith("(")) else expr


def _expand(text: str, macros: Mapping[str, str]) -> str:
    return re.sub(r"\$\((\w+)\)", lambda m: macros.get(m.group(1), m.group(0)), text)


def _logical_lines(text: str) -> list[str]:
    out: list[str] = []
    buf = ""
    in_help = False
    help_indent = 0
    for raw in text.splitlines():
        line = raw.rstrip()
        if in_help:
            stripped = line.lstrip()
            indent = len(line.expandtabs()) - len(line.expandtabs().lstrip())
            if not stripped:
                continue
            if help_indent == 0:
                help_indent = indent
            if indent >= help_indent and indent > 0:
                continue
            in_help = False
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        line = (buf + line).strip()
        buf = ""
        line = re.sub(r"\s+#.*$", "", line) if '"' not in line else line
        if not line or line.startswith("#"):
            continue
        out.append(line)
        if line in ("help", "---help---"):
            in_help, help_indent = True, 0
    return out


# --------------------------------------------------------------------------- expressions

_TOKEN_RE = re.compile(r'\s*(\|\||&&|!=|<=|>=|[()!=<>]|"[^"]*"|[A-Za-z0-9_.$\-]+)')


def evaluate(expr: str, config: Mapping[str, str]) -> int:
    """Evaluate a Kconfig expression with tristate logic: 0 = n, 1 = m, 2 = y."""
    tokens: list[str] = []
    pos = 0
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if not m or not m.group(1):
            break
        tokens.append(m.group(1))
        pos = m.end()
    parser = _ExprParser(tokens, config)
    try:
        return parser.parse_or()
    except (IndexError, ValueError):
        return 2  # do not blame what we cannot parse


class _ExprParser:
    def __init__(self, tokens: list[str], config: Mapping[str, str]) -> None:
        self.t = tokens
        self.i = 0
        self.config = config

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self) -> str:
        tok = self.t[self.i]
        self.i += 1
        return tok

    def parse_or(self) -> int:
        v = self.parse_and()
        while self.peek() == "||":
            self.take()
            v = max(v, self.parse_and())
        return v

    def parse_and(self) -> int:
        v = self.parse_not()
        while self.peek() == "&&":
            self.take()
            v = min(v, self.parse_not())
        return v

    def parse_not(self) -> int:
        if self.peek() == "!":
            self.take()
            return 2 - self.parse_not()
        return self.parse_cmp()

    def parse_cmp(self) -> int:
        if self.peek() == "(":
            self.take()
            v = self.parse_or()
            if self.peek() == ")":
                self.take()
            return v
        left = self.take()
        op = self.peek()
        if op in ("=", "!=", "<", ">", "<=", ">="):
            self.take()
            right = self.take()
            a, b = self.value(left), self.value(right)
            res: bool
            if op in ("=", "!="):
                res = (a == b) == (op == "=")
            else:
                try:
                    x, y = int(a, 0), int(b, 0)
                except ValueError:
                    x, y = 0, 0
                res = {"<": x < y, ">": x > y, "<=": x <= y, ">=": x >= y}[op]
            return 2 if res else 0
        return {"y": 2, "m": 1}.get(self.value(left), 0)

    def value(self, tok: str) -> str:
        if tok.startswith('"'):
            return tok.strip('"')
        if tok in ("y", "m", "n"):
            return tok
        if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok):
            return tok
        return self.config.get(f"CONFIG_{tok}", "n").strip('"')


def split_unknown(mismatches: Iterable[Mismatch], index: KconfigIndex,
                  tolerant: Iterable[str]) -> tuple[list[Mismatch], list[Mismatch]]:
    """(kept, skipped): options requested by a ``tolerant`` fragment that this tree's
    Kconfig does not define at all are skipped. base.config is tolerant: it names the
    options of several kernel generations (e.g. PAGE_TABLE_ISOLATION on 6.1 and
    MITIGATION_PAGE_TABLE_ISOLATION from 6.9 on). Any other fragment's unknown option
    is an error (a typo, or a series that does not add what it claims)."""
    names = set(tolerant)
    kept: list[Mismatch] = []
    skipped: list[Mismatch] = []
    for mm in mismatches:
        unknown = mm.symbol.removeprefix("CONFIG_") not in index.defs
        (skipped if unknown and mm.fragment in names else kept).append(mm)
    return kept, skipped


def explain_mismatches(mismatches: Iterable[Mismatch], srctree: Path,
                       final: Mapping[str, str], arch: str = "x86",
                       index: KconfigIndex | None = None) -> list[str]:
    """One line per option that did not stick, with its unmet dependency where known."""
    items = list(mismatches)
    if not items:
        return []
    if index is None:
        try:
            index = KconfigIndex.load(srctree, arch=arch)
        except OSError:
            index = None
    lines = []
    for mm in items:
        why = index.explain(mm.symbol, mm.requested, final) if index else "reason unknown"
        src = ("inline" if mm.fragment.startswith("CONFIG_") else Path(mm.fragment).name)
        lines.append(f"{mm.symbol}={mm.requested} (from {src}), final value {mm.actual}: {why}")
    return lines
