"""Steps (what the explorer asks a service to do) and answers (what the guest said).

A `Step` is symbolic: it names services by the host's names (a, b, ...),
memory by region names the model gave (r1, r2, ...) and peers' keys by the
service (`key_of: b`), so a saved sequence means the same on a fresh guest,
where pids, ids, keys and addresses differ. The session resolves a step
into the agent's concrete command (`Agent.call(op, **args)`).
"""

from __future__ import annotations

import errno as errno_mod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class Step:
    op: str
    svc: str
    args: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "svc": self.svc, **dict(self.args)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Step:
        if not isinstance(d, Mapping) or not isinstance(d.get("op"), str) \
                or not isinstance(d.get("svc"), str):
            raise ValueError(f"a step needs string fields op and svc: {d!r}")
        args = {k: v for k, v in d.items() if k not in ("op", "svc")}
        for k, v in args.items():
            if not isinstance(v, (str, int)) or isinstance(v, bool):
                raise ValueError(f"step argument {k}={v!r} is neither a string nor an integer")
        return cls(d["op"], d["svc"], args)

    def text(self) -> str:
        args = " ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.svc}: {self.op}" + (f" {args}" if args else "")


@dataclass(frozen=True)
class Answer:
    """One answer of the agent: kind ok | err | fault | died | timeout, and its fields."""

    kind: str
    fields: Mapping[str, str] = field(default_factory=dict)
    line: str = ""
    event: str = ""  # for an asynchronous event (kind "event"): its name

    def get_int(self, key: str) -> int | None:
        v = self.fields.get(key)
        if v is None:
            return None
        try:
            return int(v, 0)
        except ValueError:
            return None

    @property
    def errname(self) -> str | None:
        if self.kind != "err":
            return None
        name = self.fields.get("name")
        if name:
            return name
        n = self.get_int("errno")
        return errno_mod.errorcode.get(n, str(n)) if n is not None else None

    def text(self) -> str:
        if self.line:
            return self.line
        rest = " ".join(f"{k}={v}" for k, v in self.fields.items())
        return self.kind + (f" {rest}" if rest else "")


class AnswerLike(Protocol):
    """An answer as testbed/designs/rpal/agent.py gives it (the explorer reads only this)."""

    @property
    def kind(self) -> str: ...
    @property
    def fields(self) -> Mapping[str, str]: ...
    @property
    def event(self) -> str: ...
    @property
    def errname(self) -> str | None: ...
    def get_int(self, key: str) -> int | None: ...
    def text(self) -> str: ...


class Agent(Protocol):
    """What the explorer needs from the guest agent (testbed/designs/rpal/agent.py)."""

    def call(self, op: str, **args: Any) -> AnswerLike: ...

    def events(self) -> Sequence[AnswerLike]:
        """Asynchronous events (`* stale ...`, `* exited ...`) received since the last call."""
        ...

    def take_events(self, event: str, **fields: str) -> Sequence[AnswerLike]:
        """The events named `event` with these fields; the others stay for events()."""
        ...


# si_codes of SIGSEGV
SEGV_MAPERR = 1
SEGV_ACCERR = 2
SEGV_PKUERR = 4
SIGSEGV = 11
