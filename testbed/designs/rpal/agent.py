"""Host client of the guest agent tb-rpal_agent (protocol: guest/AGENT-PROTOCOL.md).

`Agent(sock).call("read", svc="a", addr=0x...)` sends one command line and returns the
agent's typed `Answer`; asynchronous events (`* exited ...`, `* spinfault ...`) are kept
for `events()`. Everything the guest sends is untrusted: `parse_answer` is a pure
function over bytes that either returns an `Answer` or raises `AnswerError`, and the
reader never buffers more than one line's worth.

`start_agent(machine)` connects the port of a Machine booted with
`serial_ports=(AGENT_PORT,)`, starts the agent over SSH and waits for its hello.
"""

from __future__ import annotations

import errno as errno_mod
import re
import select
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from testbed.errors import GuestError

if TYPE_CHECKING:
    from testbed.boot.machine import Machine

AGENT_PORT = "org.testbed.agent"
PROTOCOL_VERSION = 1
MAX_LINE = 4096  # bytes, newline included, both ways
STATUSES = frozenset({"ok", "err", "fault", "died", "timeout", "bad"})
DEFAULT_OP_TIMEOUT_MS = 10_000  # the agent's deadline for a service op
HOST_MARGIN_S = 10.0  # host-side wait beyond the agent's own deadline

_NAME = re.compile(r"[a-z0-9_]{1,32}")
_VALUE = re.compile(r"[A-Za-z0-9_.,:/+-]{1,4000}")
_SEQ = re.compile(r"[0-9]{1,19}")
_INT = re.compile(r"-?(0x[0-9a-fA-F]{1,16}|[0-9]{1,20})")


class AgentError(GuestError):
    """The agent broke the protocol, went silent, or the channel closed."""


class AnswerError(ValueError):
    """A line from the guest that is not a valid answer or event."""


@dataclass(frozen=True)
class Answer:
    """One line from the agent.

    status: ok | err | fault | died | timeout | bad, or "event" for `* <event> ...`
    lines (then `event` names it and seq is 0).
    """

    seq: int
    status: str
    fields: Mapping[str, str] = field(default_factory=dict)
    event: str = ""
    line: str = ""

    @property
    def kind(self) -> str:
        return self.status

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def get(self, key: str) -> str | None:
        return self.fields.get(key)

    def get_int(self, key: str) -> int | None:
        """The field as an int (decimal or 0x-hex), None when absent or not a number."""
        v = self.fields.get(key)
        if v is None or not _INT.fullmatch(v):
            return None
        return int(v, 0)

    def need_int(self, key: str) -> int:
        """The field as an int; AgentError naming the field when absent or malformed."""
        v = self.get_int(key)
        if v is None:
            raise AgentError(f"agent answer {self.text()!r} lacks a numeric field {key!r}")
        return v

    def int_list(self, key: str) -> list[int]:
        """A comma list of ints (`keys=3,4`), [] for `none`; AgentError if malformed."""
        v = self.fields.get(key)
        if v is None:
            raise AgentError(f"agent answer {self.text()!r} lacks the list field {key!r}")
        if v == "none":
            return []
        items = v.split(",")
        if not all(_INT.fullmatch(x) for x in items):
            raise AgentError(f"agent answer field {key}={v!r} is not a list of numbers")
        return [int(x, 0) for x in items]

    @property
    def errno(self) -> int | None:
        return self.get_int("errno") if self.status == "err" else None

    @property
    def errname(self) -> str | None:
        """ENOENT etc. for an `err` answer (from name=, else from errno=), else None."""
        if self.status != "err":
            return None
        name = self.fields.get("name")
        if name and re.fullmatch(r"E[A-Z0-9]{1,20}", name):
            return name
        n = self.errno
        return errno_mod.errorcode.get(n, f"E{n}") if n is not None else None

    def text(self) -> str:
        if self.line:
            return self.line
        rest = " ".join(f"{k}={v}" for k, v in self.fields.items())
        head = f"* {self.event}" if self.status == "event" else f"{self.seq} {self.status}"
        return head + (f" {rest}" if rest else "")


def parse_answer(raw: bytes) -> Answer:
    """Parse one line from the agent (with or without its newline). Pure; raises AnswerError."""
    if len(raw) > MAX_LINE:
        raise AnswerError(f"line of {len(raw)} bytes (more than {MAX_LINE})")
    if raw.endswith(b"\n"):
        raw = raw[:-1]
    if b"\n" in raw:
        raise AnswerError("more than one line")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise AnswerError("not ASCII") from None
    if not text.isprintable():
        raise AnswerError("control characters in the line")
    tokens = text.split(" ")
    if len(tokens) < 2 or any(t == "" for t in tokens):
        raise AnswerError("not '<seq> <status> [key=value ...]'")
    head, kind, rest = tokens[0], tokens[1], tokens[2:]
    if head == "*":
        if not _NAME.fullmatch(kind):
            raise AnswerError(f"bad event name {kind[:40]!r}")
        seq, status, event = 0, "event", kind
    else:
        if not _SEQ.fullmatch(head) or int(head) >= 1 << 63:
            raise AnswerError(f"bad sequence number {head[:40]!r}")
        if kind not in STATUSES:
            raise AnswerError(f"unknown status {kind[:40]!r}")
        seq, status, event = int(head), kind, ""
    fields: dict[str, str] = {}
    for tok in rest:
        key, eq, value = tok.partition("=")
        if not eq or not _NAME.fullmatch(key):
            raise AnswerError(f"bad field {tok[:40]!r}")
        if key in fields:
            raise AnswerError(f"field {key!r} given twice")
        if not _VALUE.fullmatch(value):
            raise AnswerError(f"bad value of field {key!r}")
        fields[key] = value
    return Answer(seq, status, fields, event, text)


def _arg_text(key: str, value: Any) -> str:
    if not _NAME.fullmatch(key):
        raise ValueError(f"agent argument name {key!r} is not [a-z0-9_]")
    if isinstance(value, bool):
        raise ValueError(f"agent argument {key}: give 0/1, not a bool")
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value
    else:
        raise ValueError(f"agent argument {key}={value!r} is neither int nor str")
    if not _VALUE.fullmatch(text):
        raise ValueError(f"agent argument {key}={text[:40]!r} has characters the protocol "
                         "does not allow")
    return f"{key}={text}"


def format_command(seq: int, op: str, args: Mapping[str, Any]) -> bytes:
    """`<seq> <op> key=value ...\\n`, validated; ValueError for what the protocol can't carry."""
    if not 0 < seq < 1 << 63:
        raise ValueError(f"sequence number {seq} out of range")
    if not _NAME.fullmatch(op):
        raise ValueError(f"agent op {op!r} is not [a-z0-9_]")
    line = " ".join([str(seq), op, *(_arg_text(k, v) for k, v in args.items())]) + "\n"
    data = line.encode("ascii")
    if len(data) > MAX_LINE:
        raise ValueError(f"agent command of {len(data)} bytes (more than {MAX_LINE})")
    return data


class LineReader:
    """Bounded line reader over a socket: at most MAX_LINE bytes per line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def next_line(self, deadline: float) -> bytes | None:
        """The next line (with its newline), or None at the deadline. AgentError on EOF."""
        while True:
            nl = self.buf.find(b"\n")
            if nl >= 0:
                line, self.buf = self.buf[:nl + 1], self.buf[nl + 1:]
                return line
            if len(self.buf) >= MAX_LINE:
                raise AgentError(f"the agent sent a line longer than {MAX_LINE} bytes")
            left = max(0.0, deadline - time.monotonic())  # 0: just look
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            try:
                chunk = self.sock.recv(MAX_LINE)
            except OSError as exc:
                raise AgentError(f"the agent channel failed ({exc})") from exc
            if not chunk:
                raise AgentError("the agent channel closed (agent or guest gone)")
            self.buf += chunk


class Agent:
    """A connected agent. One command at a time; events are queued for `events()`."""

    def __init__(self, sock: socket.socket, *, host_margin: float = HOST_MARGIN_S) -> None:
        self.sock = sock
        self.reader = LineReader(sock)
        self.host_margin = host_margin
        self._seq = 0
        self._events: list[Answer] = []
        self.hello: Answer | None = None
        self.log: list[tuple[float, str, str]] = []  # (monotonic time, "<" | ">", line)

    def _send(self, data: bytes) -> None:
        self.log.append((time.monotonic(), ">", data.decode("ascii").rstrip("\n")))
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise AgentError(f"cannot send to the agent ({exc})") from exc

    def _read(self, deadline: float) -> Answer | None:
        raw = self.reader.next_line(deadline)
        if raw is None:
            return None
        try:
            a = parse_answer(raw)
        except AnswerError as exc:
            raise AgentError(f"the agent sent garbage: {exc}: {raw[:80]!r}") from None
        self.log.append((time.monotonic(), "<", a.line))
        return a

    def wait_hello(self, timeout: float = 30.0) -> Answer:
        deadline = time.monotonic() + timeout
        while True:
            a = self._read(deadline)
            if a is None:
                raise AgentError(f"the agent did not say hello within {timeout:.0f} s")
            if a.status == "event" and a.event == "hello":
                if a.get_int("version") != PROTOCOL_VERSION:
                    raise AgentError(f"agent protocol version {a.get('version')!r}, "
                                     f"this host speaks {PROTOCOL_VERSION}")
                self.hello = a
                return a
            self._events.append(a)

    def call(self, op: str, *, host_timeout: float | None = None, **args: Any) -> Answer:
        """Send `op` with `args`; return its answer (status ok/err/fault/died/timeout/bad).

        Raises AgentError when the agent does not answer within its own deadline
        (`timeout_ms`, default 10 s; spawn 30 s) plus a margin, sends garbage or an
        answer to another command.
        """
        self._seq += 1
        seq = self._seq
        data = format_command(seq, op, args)
        if host_timeout is None:
            ms = args.get("timeout_ms")
            base = (ms if isinstance(ms, int) else
                    30_000 if op == "spawn" else 120_000 if op in ("fill", "unfill")
                    else DEFAULT_OP_TIMEOUT_MS) / 1000
            host_timeout = base + self.host_margin
        self._send(data)
        deadline = time.monotonic() + host_timeout
        while True:
            a = self._read(deadline)
            if a is None:
                raise AgentError(f"the agent did not answer {data.decode().strip()!r} "
                                 f"within {host_timeout:.0f} s")
            if a.status == "event" or a.seq == 0:  # `0 bad`: a line the agent could not read
                self._events.append(a)
                continue
            if a.seq != seq:
                raise AgentError(f"the agent answered {a.line!r} to command {seq}")
            return a

    def events(self) -> list[Answer]:
        """Events received so far (and any waiting on the socket now); clears the queue."""
        while True:
            a = self._read(time.monotonic())
            if a is None:
                break
            if a.status != "event" and a.seq != 0:
                raise AgentError(f"unexpected answer {a.line!r} outside a command")
            self._events.append(a)
        out, self._events = self._events, []
        return out

    def take_events(self, event: str, **fields: str) -> list[Answer]:
        """The events named `event` whose fields include `fields`; the others stay queued
        for events()."""
        self._events += self.events()
        took = [a for a in self._events if a.event == event
                and all(a.fields.get(k) == v for k, v in fields.items())]
        self._events = [a for a in self._events if not any(a is t for t in took)]
        return took

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Answer]:  # the queued events
        return iter(self.events())


def start_agent(machine: Machine, *, timeout: float = 60.0, swap: bool = True) -> Agent:
    """Connect the agent port of `machine`, start tb-rpal_agent in the guest, await hello."""
    sock = machine.port_socket(AGENT_PORT)
    agent = Agent(sock)
    try:
        cmd = "tb-rpal_agent --daemon" + ("" if swap else " --no-swap")
        res = machine.run(cmd, timeout=timeout, label="start tb-rpal_agent")
        if res.status != 0:
            raise AgentError(f"tb-rpal_agent did not start (exit status {res.status}): "
                             f"{res.stderr.decode(errors='replace').strip()[:200]}")
        agent.wait_hello(timeout)
    except BaseException:
        agent.close()
        raise
    return agent
