"""Choosing what runs: `-k EXPR` (by scenario, mode or check name) and `--shard I/N`.

`-k` takes pytest's syntax: words joined with `and`, `or`, `not` and parentheses; a
word matches when it is a substring (case-insensitive) of one of the item's names
(for a scenario run: its scenario name, SCENARIO@MODE, its mode, its checks).

`--shard I/N` keeps every N-th item of the full, ordered list starting at the I-th
(1-based): the same list and N give the same split on every host, the N shards
together hold every item exactly once, and their sizes differ by at most one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from testbed.errors import UsageError

T = TypeVar("T")
Matcher = Callable[[Iterable[str]], bool]

_TOKEN = re.compile(r"\s*(?:(\()|(\))|([\w@:.*+/\[\]-]+))")


def parse_keyword(expr: str) -> Matcher:
    """`-k EXPR` as a predicate over an item's names; UsageError names a malformed one."""
    tokens: list[str] = []
    pos = 0
    text = expr.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise UsageError(f"-k {expr!r}: cannot read {text[pos:]!r} (words, and, or, "
                             "not, parentheses)")
        tokens.append(m.group(m.lastindex or 0))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if not tokens:
        raise UsageError(f"-k {expr!r}: give a scenario or check name")
    node, rest = _or(tokens, expr)
    if rest:
        raise UsageError(f"-k {expr!r}: unexpected {rest[0]!r}")

    def match(names: Iterable[str]) -> bool:
        low = [n.lower() for n in names]
        return node(low)

    return match


Node = Callable[[list[str]], bool]


def _or(toks: list[str], expr: str) -> tuple[Node, list[str]]:
    left, toks = _and(toks, expr)
    while toks and toks[0] == "or":
        right, toks = _and(toks[1:], expr)
        left = (lambda a, b: lambda n: a(n) or b(n))(left, right)
    return left, toks


def _and(toks: list[str], expr: str) -> tuple[Node, list[str]]:
    left, toks = _not(toks, expr)
    while toks and toks[0] == "and":
        right, toks = _not(toks[1:], expr)
        left = (lambda a, b: lambda n: a(n) and b(n))(left, right)
    return left, toks


def _not(toks: list[str], expr: str) -> tuple[Node, list[str]]:
    if not toks:
        raise UsageError(f"-k {expr!r}: ends where a name was expected")
    if toks[0] == "not":
        inner, rest = _not(toks[1:], expr)
        return (lambda n: not inner(n)), rest
    if toks[0] == "(":
        inner, rest = _or(toks[1:], expr)
        if not rest or rest[0] != ")":
            raise UsageError(f"-k {expr!r}: a '(' is not closed")
        return inner, rest[1:]
    if toks[0] in (")", "and", "or"):
        raise UsageError(f"-k {expr!r}: unexpected {toks[0]!r}")
    word = toks[0].lower()
    return (lambda n: any(word in x for x in n)), toks[1:]


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def take(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index - 1::self.count])


def parse_shard(text: str) -> Shard:
    """`I/N` with 1 <= I <= N; UsageError otherwise."""
    m = re.fullmatch(r"\s*(\d{1,6})\s*/\s*(\d{1,6})\s*", text or "")
    if not m:
        raise UsageError(f"--shard {text!r}: give I/N, e.g. 1/4 (shard I of N, from 1)")
    i, n = int(m.group(1)), int(m.group(2))
    if not 1 <= i <= n:
        raise UsageError(f"--shard {text}: I must be 1..N (here N is {n})")
    return Shard(i, n)
