"""Hardware detection and hand-written hardware profiles.

What cannot be detected stays ``None`` (shown as "unknown"); nothing is invented -- a planner
that assumed 8 GB when detection failed would promise runs that then crash. A profile can also be
written by hand (YAML or JSON, the same fields as ``scaler-wizard hardware --json``) to plan for a
machine you do not have.

torch and psutil are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InputError

GiB = 2**30
# Share of the device memory a plan may fill: the rest is left to the data loader, other
# processes and the allocator's bad days.
PLANNING_HEADROOM = 0.9


class GpuInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int = 0
    name: str = "unknown"
    total_memory_gb: float | None = Field(None, ge=0)
    free_memory_gb: float | None = Field(None, ge=0)
    compute_capability: str | None = None
    bf16: bool | None = None


class HardwareProfile(BaseModel):
    """One machine. ``accelerator`` is where training runs: cuda, mps or cpu."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["detected", "file"] = "file"
    accelerator: Literal["cuda", "mps", "cpu"] = "cpu"
    gpus: list[GpuInfo] = Field(default_factory=list)
    mps_available: bool | None = None
    cpu_cores: int | None = Field(None, ge=1)
    ram_total_gb: float | None = Field(None, ge=0)
    ram_available_gb: float | None = Field(None, ge=0)
    disk_free_gb: float | None = Field(None, ge=0)
    disk_path: str | None = None
    bitsandbytes: bool | None = Field(None, description="bitsandbytes importable (4-bit QLoRA)")
    notes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> HardwareProfile:
        if self.accelerator == "cuda" and not self.gpus:
            raise ValueError("accelerator 'cuda' needs at least one entry in gpus")
        return self

    @property
    def gpu_count(self) -> int:
        return len(self.gpus)

    def device_memory_bytes(self) -> float | None:
        """Memory one training process may use: the smallest GPU (data parallel replicates the
        step on each), the unified memory on Apple silicon, else the available RAM."""
        if self.accelerator == "cuda":
            sizes = [g.total_memory_gb for g in self.gpus]
            return None if any(s is None for s in sizes) else min(sizes) * GiB
        if self.accelerator == "mps":
            return None if self.ram_total_gb is None else self.ram_total_gb * GiB
        return None if self.ram_available_gb is None else self.ram_available_gb * GiB

    def training_budget_bytes(self) -> float | None:
        """The memory a plan may use (``PLANNING_HEADROOM`` of :meth:`device_memory_bytes`)."""
        mem = self.device_memory_bytes()
        return None if mem is None else mem * PLANNING_HEADROOM

    def supports_bf16(self) -> bool | None:
        if self.accelerator == "cuda":
            flags = [g.bf16 for g in self.gpus]
            return None if any(f is None for f in flags) else all(flags)
        return True if self.accelerator == "cpu" else None

    def can_qlora(self) -> bool:
        return self.accelerator == "cuda" and self.bitsandbytes is True

    def summary_rows(self) -> list[tuple[str, str]]:
        def gb(v: float | None) -> str:
            return "unknown" if v is None else f"{v:.1f} GB"

        rows = [("source", self.source), ("accelerator", self.accelerator), ("GPUs", str(self.gpu_count))]
        for g in self.gpus:
            rows.append((
                f"GPU {g.index}",
                f"{g.name}, {gb(g.total_memory_gb)} total, {gb(g.free_memory_gb)} free, "
                f"capability {g.compute_capability or 'unknown'}, bf16 {_tri(g.bf16)}",
            ))
        rows += [
            ("Apple MPS", _tri(self.mps_available)),
            ("CPU cores", "unknown" if self.cpu_cores is None else str(self.cpu_cores)),
            ("RAM total", gb(self.ram_total_gb)),
            ("RAM available", gb(self.ram_available_gb)),
            (f"disk free ({self.disk_path or '?'})", gb(self.disk_free_gb)),
            ("bitsandbytes", _tri(self.bitsandbytes)),
            ("training memory budget", gb(None if self.device_memory_bytes() is None else self.device_memory_bytes() / GiB)),
        ]
        return rows + [("note", n) for n in self.notes]


def _tri(v: bool | None) -> str:
    return "unknown" if v is None else ("yes" if v else "no")


def _gb(n: float | None) -> float | None:
    return None if n is None else round(n / GiB, 2)


def _detect_gpus(torch: Any, notes: list[str], query_devices: bool = True) -> list[GpuInfo]:
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        free = bf16 = None
        if query_devices:  # both queries create a CUDA context on device i
            try:
                free, _ = torch.cuda.mem_get_info(i)
            except Exception as exc:  # a busy or restricted device may refuse the query
                notes.append(f"free memory of GPU {i} unknown ({type(exc).__name__})")
            try:
                with torch.cuda.device(i):
                    bf16 = bool(torch.cuda.is_bf16_supported())
            except Exception:
                notes.append(f"bf16 support of GPU {i} unknown")
        gpus.append(GpuInfo(
            index=i, name=props.name, total_memory_gb=_gb(props.total_memory), free_memory_gb=_gb(free),
            compute_capability=f"{props.major}.{props.minor}", bf16=bf16,
        ))
    return gpus


def detect_hardware(output_dir: str | Path = ".", *, query_devices: bool = True) -> HardwareProfile:
    """Inspect this machine. ``output_dir`` is where runs will be written (its free disk counts).
    ``query_devices=False`` reads the GPUs' properties only: free memory and bf16 support stay
    unknown, and no CUDA context is created on a GPU the caller does not use."""
    notes: list[str] = []
    gpus: list[GpuInfo] = []
    mps = None
    try:
        import torch

        if torch.cuda.is_available():
            gpus = _detect_gpus(torch, notes, query_devices)
        mps_backend = getattr(torch.backends, "mps", None)
        mps = bool(mps_backend and mps_backend.is_available())
    except ImportError:
        notes.append("torch not importable: GPUs unknown")
    ram_total = ram_avail = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        ram_total, ram_avail = _gb(vm.total), _gb(vm.available)
    except ImportError:
        notes.append("psutil not importable: RAM unknown")
    disk_path = Path(output_dir).expanduser().resolve()
    probe = disk_path
    while not probe.exists() and probe != probe.parent:  # the folder may not exist yet
        probe = probe.parent
    try:
        disk_free = _gb(shutil.disk_usage(probe).free)
    except OSError:
        disk_free = None
        notes.append(f"free disk at {disk_path} unknown")
    try:
        import importlib.util

        bnb = importlib.util.find_spec("bitsandbytes") is not None
    except (ImportError, ValueError):
        bnb = None
    accelerator = "cuda" if gpus else ("mps" if mps else "cpu")
    return HardwareProfile(
        source="detected", accelerator=accelerator, gpus=gpus, mps_available=mps, cpu_cores=os.cpu_count(),
        ram_total_gb=ram_total, ram_available_gb=ram_avail, disk_free_gb=disk_free, disk_path=str(disk_path),
        bitsandbytes=bnb, notes=notes,
    )


def hardware_record(profile: HardwareProfile | None = None) -> dict[str, Any]:
    """The ``hardware`` block of a run's ``envelope.json``: platform, python and torch versions,
    CPU count, total RAM and the CUDA devices (name, total GB), from :func:`detect_hardware`
    without device queries (a run must not open a context on GPUs it does not train on)."""
    import platform

    p = profile if profile is not None else detect_hardware(query_devices=False)
    try:
        import torch

        torch_version: str | None = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "cpu_count": p.cpu_cores,
        "ram_total_gb": p.ram_total_gb,
        "cuda_devices": [{"name": g.name, "total_gb": g.total_memory_gb} for g in p.gpus],
    }


def load_hardware_profile(path: str | Path) -> HardwareProfile:
    """A hand-written profile (YAML or JSON). Missing fields stay unknown."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"Hardware profile {file} not found.",
                         hint="Write one with `scaler-wizard hardware --json > hw.json` and edit it.")
    try:
        text = file.read_text(encoding="utf-8")
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as exc:
        raise InputError(f"Hardware profile {file} is not valid JSON/YAML ({exc}).") from None
    if not isinstance(data, dict):
        raise InputError(f"Hardware profile {file} must be a mapping of fields (accelerator, gpus, ...).")
    data.setdefault("source", "file")
    try:
        return HardwareProfile.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(profile)'}: {e['msg']}" for e in exc.errors())
        raise InputError(f"Hardware profile {file} is invalid: {problems}.",
                         hint="See `scaler-wizard hardware --json` for the fields.") from None


def gpu_profile(name: str, memory_gb: float, count: int = 1, *, bf16: bool = True,
                bitsandbytes: bool = True) -> HardwareProfile:
    """A profile for a GPU you name (used by docs/hardware.md and for planning ahead)."""
    return HardwareProfile(
        source="file", accelerator="cuda", bitsandbytes=bitsandbytes,
        gpus=[GpuInfo(index=i, name=name, total_memory_gb=memory_gb, bf16=bf16) for i in range(count)],
    )
