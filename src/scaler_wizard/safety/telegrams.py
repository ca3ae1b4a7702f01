"""The telegram channel of a run, both ways.

Out (envelope -> cockpit, CLI, pipeline): :class:`TelegramWriter` replaces
``runs/<id>/telegram.json`` atomically (readers never see half a telegram) and appends every
telegram to ``telegrams.jsonl`` (fsynced: the history of safety decisions must survive the
crash it may be about; routine ``continue`` telegrams are rate-limited and not fsynced).

In (operator -> training): ``control.jsonl`` holds commands written by the cockpit or the CLI,
one JSON object per line::

    {"timestamp": "...", "action": "abort" | "approve" | "rollback", "args": {...}, "source": "cockpit"}

:func:`append_control_command` writes one; :class:`ControlInbox` reads new ones without
blocking (a torn or malformed line is reported with its line number, never acted on).

No torch here.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..telemetry.reader import CorruptLine, JsonlTail, ReadResult, read_jsonl
from ..telemetry.sink import append_jsonl, utc_now, write_json_atomic
from .envelope import Telegram

TELEGRAM_FILE = "telegram.json"
TELEGRAM_HISTORY_FILE = "telegrams.jsonl"
CONTROL_FILE = "control.jsonl"

ControlAction = Literal["abort", "approve", "rollback"]


class TelegramWriter:
    """Writes telegrams of one run; a no-op on every process but the main one.

    Cost control (the envelope speaks at every log step; replacing a file costs ~1 ms and an
    fsync ~10 ms on a busy disk): ``telegram.json`` is replaced when the action changes, on
    every ``stop``, and otherwise at most every ``continue_interval_s`` seconds (0: always);
    ``telegrams.jsonl`` gets every ``warn`` and ``stop`` and the ``continue`` telegrams that
    replaced the file. Actions in ``durable_actions`` (default: ``stop``) are fsynced before
    :meth:`write` returns: the telegram that halts a run must survive the crash it may precede.
    """

    def __init__(self, run_dir: Path, *, is_main_process: bool = True, continue_interval_s: float = 5.0,
                 durable_actions: frozenset[str] | set[str] = frozenset({"stop"})):
        self.run_dir = Path(run_dir)
        self.enabled = is_main_process
        self.continue_interval_s = continue_interval_s
        self.durable_actions = frozenset(durable_actions)
        self.latest: dict[str, Any] | None = None
        self.written = 0
        self.skipped = 0
        self._last_action: str | None = None
        self._last_write = -math.inf

    @property
    def telegram_path(self) -> Path:
        return self.run_dir / TELEGRAM_FILE

    @property
    def history_path(self) -> Path:
        return self.run_dir / TELEGRAM_HISTORY_FILE

    def write(self, telegram: Telegram | dict[str, Any], *, force: bool = False) -> dict[str, Any]:
        """Persist one telegram (latest + history) unless rate-limited; returns its JSON form."""
        payload = telegram.to_dict() if isinstance(telegram, Telegram) else dict(telegram)
        self.latest = payload
        if not self.enabled:
            return payload
        action = payload.get("action")
        now = time.monotonic()
        durable = action in self.durable_actions
        # same action as the file already shows, within the interval: the file may lag a little
        repeat = action == self._last_action and action != "stop" and not force \
            and now - self._last_write < self.continue_interval_s
        if repeat and action == "continue":
            self.skipped += 1
            return payload
        if not repeat:
            write_json_atomic(self.telegram_path, payload, durable=durable)
            self._last_action, self._last_write = action, now
        append_jsonl(self.history_path, payload, fsync=durable)  # every warn/stop is in the history
        self.written += 1
        return payload


def read_telegram(run_dir: Path) -> dict[str, Any] | None:
    """The latest telegram of a run, or ``None`` if the envelope has not spoken yet."""
    path = Path(run_dir) / TELEGRAM_FILE
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def read_telegram_history(run_dir: Path) -> ReadResult:
    path = Path(run_dir) / TELEGRAM_HISTORY_FILE
    return read_jsonl(path) if path.exists() else ReadResult(path)


class ControlCommand(BaseModel):
    """One operator command; unknown extra keys are kept (forward compatible)."""

    model_config = ConfigDict(extra="allow")

    timestamp: str = Field(default_factory=utc_now)
    action: ControlAction
    args: dict[str, Any] = Field(default_factory=dict)
    source: str = "cli"


def append_control_command(run_dir: Path, action: ControlAction, args: dict[str, Any] | None = None,
                           source: str = "cli") -> ControlCommand:
    """Append a command to ``run_dir/control.jsonl`` (fsynced); the running trainer sees it
    at its next step. ``args`` of a rollback: ``{"to_step": N}`` or ``{"to_stage": k}``."""
    command = ControlCommand(action=action, args=args or {}, source=source)
    append_jsonl(Path(run_dir) / CONTROL_FILE, command.model_dump(mode="json"), fsync=True)
    return command


class ControlInbox:
    """Non-blocking reader of new commands in ``control.jsonl``.

    ``from_start=False`` (default) ignores commands already in the file when the inbox is
    created: a command is meant for the training that is running when it is written. Give the
    pipeline one inbox per run and pass it to every stage's callback, so a command written
    between stages is still seen.
    """

    def __init__(self, path: Path, *, from_start: bool = False):
        self.path = Path(path)
        self._tail = JsonlTail(self.path, from_start=from_start)
        self.rejected: list[CorruptLine] = []
        self.received: list[ControlCommand] = []
        self._line_numbers_seen = 0

    def poll(self) -> list[ControlCommand]:
        commands: list[ControlCommand] = []
        for line_number, record in self._tail.poll_numbered():
            try:
                commands.append(ControlCommand.model_validate(record))
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in exc.errors())
                self.rejected.append(CorruptLine(line_number, f"invalid command: {problems}", json.dumps(record)[:200]))
        if len(self._tail.corrupt) > self._line_numbers_seen:
            self.rejected.extend(self._tail.corrupt[self._line_numbers_seen:])
            self._line_numbers_seen = len(self._tail.corrupt)
        self.received.extend(commands)
        return commands


__all__ = [
    "CONTROL_FILE",
    "TELEGRAM_FILE",
    "TELEGRAM_HISTORY_FILE",
    "ControlCommand",
    "ControlInbox",
    "TelegramWriter",
    "append_control_command",
    "read_telegram",
    "read_telegram_history",
]
