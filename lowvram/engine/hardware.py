"""This machine's GPUs and RAM, or the what-if machine a plan is asked for.

    hardware = detect_hardware(settings)      # ENGINE_GPU_MEMORY / ENGINE_HOST_MEMORY win
    hardware.gpu, hardware.host

`lowvram plan` and `lowvram serve` both go through `detect_hardware`, so a what-if plan is
the plan `serve` would make on such a machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lowvram.engine.settings import EngineSettings
from lowvram.engine.units import gib


@dataclass(frozen=True)
class GpuFacts:
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class HostFacts:
    total_bytes: int
    available_bytes: int


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[GpuFacts, ...]
    host: HostFacts

    @property
    def gpu(self) -> GpuFacts | None:
        """The GPU the engine runs on (the first)."""
        return self.gpus[0] if self.gpus else None


def detect_hardware(settings: EngineSettings) -> Hardware:
    """The GPUs and host RAM to plan for: this machine's, unless the settings say what-if.

    A what-if GPU (`gpu_memory`) is a card of that size with nothing else on it, with this
    machine's compute capability where it has a GPU (FP8 and bfloat16 depend on it).
    """
    gpus = tuple(detect_gpus())
    if settings.gpu_memory is not None:
        total = int(settings.gpu_memory)
        capability = gpus[0].compute_capability if gpus else (0, 0)
        gpus = (GpuFacts(f"{gib(total)} GPU (what-if)", total, total, capability),)
    host = detect_host()
    if settings.host_memory is not None:
        host = HostFacts(int(settings.host_memory), int(settings.host_memory))
    return Hardware(gpus, host)


def detect_gpus() -> list[GpuFacts]:
    """NVIDIA GPUs through NVML when importable, else nvidia-smi; [] without either."""
    try:
        return _nvml_gpus()
    except Exception:  # no pynvml, no driver, no GPU: all mean "ask nvidia-smi"
        pass
    if shutil.which("nvidia-smi") is None:
        return []
    query = "--query-gpu=name,memory.total,memory.free,compute_cap"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        name, total, free, cap = (part.strip() for part in line.split(","))
        major, _, minor = cap.partition(".")
        gpus.append(
            GpuFacts(name, int(total) * 2**20, int(free) * 2**20, (int(major), int(minor or 0)))
        )
    return gpus


def _nvml_gpus() -> list[GpuFacts]:
    import pynvml

    pynvml.nvmlInit()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(
                GpuFacts(
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(memory.total),
                    int(memory.free),
                    (int(major), int(minor)),
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_used() -> int | None:
    """Bytes in use on GPU 0 (the whole card, as nvidia-smi shows it)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        return int(out.strip().splitlines()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def detect_host() -> HostFacts:
    """RAM from /proc/meminfo (what pinned, offloaded weights compete for)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        total = int(fields["MemTotal"].split()[0]) * 1024
        available = int(fields.get("MemAvailable", fields["MemTotal"]).split()[0]) * 1024
        return HostFacts(total, available)
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return HostFacts(pages, pages)
