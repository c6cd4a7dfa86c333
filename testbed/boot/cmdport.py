"""The serial command port of recorded runs: a guest command without SSH.

Under QEMU's record/replay the guest's network is not replayed (slirp and SSH
depend on host timing), so a recorded guest gets its commands on a serial line
that its init serves (images/initramfs/cmdport.sh): ttyS1, the checkpoint line too
(QEMU's ISA serial ports cannot share an IRQ, and COM3 would share the console's),
so the host routes every line that is no checkpoint request to the command port.
The guest writes on it only when its command has ended.

Input to a recorded guest's serial line must come in short pieces: under record
QEMU reads the socket as far as the UART's 16-byte FIFO has room but fills the
FIFO later (a recorded event), so a longer message overflows it and loses bytes.
So the commands are in the guest's image (MachineConfig.rr_commands, as
/etc/testbed/cmd/N.sh) and the host sends their number; checkpoint answers are
short too. One command at a time:

    host -> guest: "run N\\n"
    guest -> host: "out\\n", stdout as base64 lines, "err\\n", stderr likewise,
                   "end STATUS\\n"

The guest's side is hostile input: `ReplyParser` takes it line by line, bounds
every line and what it keeps, and refuses anything out of order.
"""

from __future__ import annotations

import base64
import binascii
import re

from testbed.errors import GuestError

MAX_INPUT = 16  # bytes the host may send at once on a recorded serial line (the FIFO)
MAX_COMMANDS = 100  # commands in a recorded guest's image: run 0 .. run 99
MAX_REPLY_LINE = 4096  # base64 lines are 76 characters; markers are short
_B64_LINE = re.compile(rb"[A-Za-z0-9+/=]*")
_END = re.compile(rb"end (\d{1,3})")


def command_file(index: int) -> str:
    """Where command `index` lies in a recorded guest's image (pure)."""
    return f"etc/testbed/cmd/{index}.sh"


def encode_command(commands: tuple[str, ...], command: str) -> bytes:
    """The request line that runs `command`, one of the image's `commands` (pure);
    GuestError when the image lacks it."""
    if command not in commands:
        raise GuestError("a recorded guest runs only the commands put in its image at boot "
                         f"(MachineConfig.rr_commands), not {command[:60]!r}")
    index = commands.index(command)
    if index >= MAX_COMMANDS:
        raise GuestError(f"a recorded guest's image holds at most {MAX_COMMANDS} commands")
    return f"run {index}\n".encode()


def short_reply(reply: str) -> str:
    """A checkpoint's answer as a recorded guest gets it: at most MAX_INPUT bytes, "ok" or
    "err" kept (the reason stays in the host's checkpoint log), pure."""
    word = "ok" if reply.startswith("ok ") else "err"
    return f"{word} -\n"


class ReplyParser:
    """The guest's answer to one command, fed line by line (pure, bounded).

    `feed(line)` returns True once the answer is complete; then `status`, `stdout`
    and `stderr` hold it (each stream kept up to `limit` decoded bytes, `truncated`
    says when more came). A malformed line raises GuestError.
    """

    def __init__(self, limit: int = 16 << 20) -> None:
        self.limit = limit
        self.section = ""  # "", "out", "err"
        self.status: int | None = None
        self.truncated = False
        self._parts: dict[str, list[bytes]] = {"out": [], "err": []}
        self._kept = {"out": 0, "err": 0}
        self._pending = {"out": b"", "err": b""}  # base64 text not yet a multiple of 4

    def feed(self, line: bytes) -> bool:
        if self.status is not None:
            raise GuestError("the guest's command port answered more than asked")
        if len(line) > MAX_REPLY_LINE:
            raise GuestError(f"a line of {len(line)} bytes on the command port (at most "
                             f"{MAX_REPLY_LINE})")
        body = line.rstrip(b"\r\n")
        if body in (b"out", b"err"):
            want = "" if body == b"out" else "out"
            if self.section != want:
                raise GuestError(f"the command port sent {body.decode()!r} out of order")
            self.section = body.decode()
            return False
        if m := _END.fullmatch(body):
            if self.section not in ("", "err"):
                raise GuestError("the command port ended a command without its stderr")
            self._flush()
            self.status = int(m.group(1))
            return True
        if not self.section or not _B64_LINE.fullmatch(body):
            raise GuestError(f"unexpected line on the command port: {body[:60]!r}")
        self._take(self.section, body)
        return False

    def _take(self, section: str, text: bytes) -> None:
        text = self._pending[section] + text
        cut = len(text) - len(text) % 4
        self._pending[section] = text[cut:]
        self._decode(section, text[:cut])

    def _flush(self) -> None:
        for section, rest in self._pending.items():
            if rest:
                raise GuestError(f"the command port's {section} is not base64 (a "
                                 f"{len(rest)}-character rest)")

    def _decode(self, section: str, text: bytes) -> None:
        if not text:
            return
        try:
            data = base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise GuestError(f"the command port's {section} is not base64: {exc}") from None
        room = self.limit - self._kept[section]
        if len(data) > room:
            self.truncated = True
            data = data[:max(0, room)]
        self._kept[section] += len(data)
        self._parts[section].append(data)

    @property
    def stdout(self) -> bytes:
        return b"".join(self._parts["out"])

    @property
    def stderr(self) -> bytes:
        return b"".join(self._parts["err"])
