"""The few collectives the pipeline needs when it runs under ``accelerate launch`` (several
processes, one per device; gloo on CPU, NCCL on GPU).

Rule of the run directory: **only the main process writes** (run folder, status, contract and
audit, telemetry, telegrams, snapshots, adapter, report). Every process trains (the Trainer does
the data-parallel part), probes (same weights, same held-out windows: the gate decisions agree
without a message) and stops at the same step (the safety callback agrees on its decision).
What the other processes must learn from the main one -- the run folder's name, a snapshot's
id, whether an approval check passed -- goes through :meth:`Dist.broadcast_text` and
:meth:`Dist.agree`. Strings travel as byte tensors, never pickled.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import ScalerWizardError

T = TypeVar("T")
_MAX_TEXT_BYTES = 4096


class PeerFailed(ScalerWizardError):
    """Another process of the run failed; this one stops too (its error is in the main log)."""


def launched_world_size() -> int:
    """Processes started by ``accelerate launch`` / ``torchrun`` (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> Dist:
        """Join the process group ``accelerate launch`` prepared (PartialState picks gloo on CPU)."""
        if launched_world_size() <= 1:
            return cls()
        import torch
        from accelerate import PartialState

        # The same shared state TrainingArguments(use_cpu=...) builds later: gloo on CPU, NCCL on GPU.
        # (Created with the wrong `cpu` flag first, accelerate would cache a one-process state.)
        state = PartialState(cpu=not torch.cuda.is_available())
        return cls(rank=state.process_index, world_size=state.num_processes)

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast_text(self, text: str | None) -> str:
        """The main process's ``text`` on every process."""
        if not self.enabled:
            return text or ""
        import torch
        import torch.distributed as dist

        data = (text or "").encode("utf-8") if self.is_main else b""
        if len(data) > _MAX_TEXT_BYTES:
            raise ValueError(f"broadcast text longer than {_MAX_TEXT_BYTES} bytes")
        buf = torch.zeros(_MAX_TEXT_BYTES + 4, dtype=torch.uint8, device=self._device())
        if self.is_main:
            buf[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
            buf[4 : 4 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        dist.broadcast(buf, src=0)
        raw = bytes(buf.cpu().tolist())
        n = int.from_bytes(raw[:4], "little")
        return raw[4 : 4 + n].decode("utf-8")

    def gather_text(self, text: str) -> list[str]:
        """Every process's ``text``, in rank order, on every process (byte tensors, no pickle)."""
        if not self.enabled:
            return [text]
        import torch
        import torch.distributed as dist

        data = text.encode("utf-8")
        if len(data) > _MAX_TEXT_BYTES:
            raise ValueError(f"gathered text longer than {_MAX_TEXT_BYTES} bytes")
        buf = torch.zeros(_MAX_TEXT_BYTES + 4, dtype=torch.uint8, device=self._device())
        buf[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
        if data:
            buf[4 : 4 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        bufs = [torch.zeros_like(buf) for _ in range(self.world_size)]
        dist.all_gather(bufs, buf)
        out = []
        for b in bufs:
            raw = bytes(b.cpu().tolist())
            out.append(raw[4 : 4 + int.from_bytes(raw[:4], "little")].decode("utf-8"))
        return out

    def agree(self, main_only: Callable[[], T], what: str) -> T | None:
        """Run ``main_only`` on the main process; if it raises there, every process raises
        (the main one its own error, the others :class:`PeerFailed`), so none is left waiting
        in a collective. Returns its result on the main process, None elsewhere."""
        if not self.enabled:
            return main_only()
        result, error = None, None
        if self.is_main:
            try:
                result = main_only()
            except BaseException as exc:  # noqa: BLE001 - re-raised below after telling the others
                error = exc
        message = self.broadcast_text(f"{type(error).__name__}: {error}" if error is not None else "")
        if error is not None:
            raise error
        if message:
            raise PeerFailed(f"The main process failed during {what}: {message}")
        return result

    def _device(self):
        import torch
        import torch.distributed as dist

        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
