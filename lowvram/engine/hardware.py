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
from dataclasses import dataclass, replace
from pathlib import Path

from lowvram.engine.settings import EngineSettings
from lowvram.engine.units import gib

# Bytes per second per lane of each PCIe generation, after line encoding.
_LANE_BYTES_PER_S = {1: 0.25e9, 2: 0.5e9, 3: 0.985e9, 4: 1.969e9, 5: 3.938e9, 6: 7.563e9}
PINNED_EFFICIENCY = 0.87
"""Host-to-device copies from pinned memory reach ~87% of the link: 54.3-55.4 GB/s measured
on a PCIe 5.0 x16 H200 host, of 63 GB/s (docs/benchmarks.md)."""


def pcie_bytes_per_s(generation: int, width: int) -> float | None:
    """What pinned host-to-device transfers reach on a link of this generation and width."""
    lane = _LANE_BYTES_PER_S.get(generation)
    return lane * width * PINNED_EFFICIENCY if lane and width > 0 else None


@dataclass(frozen=True)
class GpuFacts:
    name: str
    total_bytes: int
    free_bytes: int
    compute_capability: tuple[int, int] = (0, 0)
    """(0, 0): unknown (a what-if GPU on a machine without one)."""
    pcie_bytes_per_s: float | None = None
    """Host-to-device rate the link allows (its generation and width); None: unknown."""
    index: int = 0
    """Its index in PCI bus order (nvidia-smi's, NVML's): what CUDA_VISIBLE_DEVICES names
    when CUDA_DEVICE_ORDER=PCI_BUS_ID."""

    @property
    def has_fp8(self) -> bool:
        """Ada, Hopper and later run FP8 matmuls; an unknown card is taken to be recent."""
        return self.compute_capability >= (8, 9) or self.compute_capability == (0, 0)

    @property
    def has_bfloat16(self) -> bool:
        return self.compute_capability >= (8, 0) or self.compute_capability == (0, 0)


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
        """The first GPU (the one a single-GPU engine runs on)."""
        return self.gpus[0] if self.gpus else None


def detect_hardware(settings: EngineSettings) -> Hardware:
    """The GPUs and host RAM to plan for: this machine's, unless the settings say what-if.

    What-if GPUs (`gpu_memory`) are `gpus` cards (default 1) of that size with nothing else
    on them, with this machine's compute capability where it has a GPU (FP8 and bfloat16
    depend on it).
    """
    gpus = tuple(detect_gpus())
    if settings.gpu_memory is not None:
        total = int(settings.gpu_memory)
        here = gpus[0] if gpus else GpuFacts("", 0, 0)
        gpus = tuple(
            GpuFacts(
                f"{gib(total)} GPU (what-if)",
                total,
                total,
                here.compute_capability,
                here.pcie_bytes_per_s,
                index,
            )
            for index in range(settings.gpus or 1)
        )
    if settings.pcie_bandwidth is not None and gpus:
        gpus = tuple(replace(g, pcie_bytes_per_s=float(settings.pcie_bandwidth)) for g in gpus)
    host = detect_host()
    if settings.host_memory is not None:
        host = HostFacts(int(settings.host_memory), int(settings.host_memory))
    return Hardware(gpus, host)


def detect_gpus() -> list[GpuFacts]:
    """The NVIDIA GPUs this process may use: through NVML when importable, else
    nvidia-smi; [] without either. Both list every GPU on the host: CUDA_VISIBLE_DEVICES,
    where set, narrows them down as it narrows CUDA's."""
    return visible(_all_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def devices_by_index() -> bool:
    """Whether CUDA_VISIBLE_DEVICES is unset or names GPUs by index: then the planner's
    indices can narrow it for each engine."""
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    return devices is None or _indices(devices) is not None


def visible(gpus: list[GpuFacts], devices: str | None) -> list[GpuFacts]:
    """The GPUs CUDA_VISIBLE_DEVICES names, in its order (indices only; a list with UUIDs
    or MIG names is left to CUDA, and all GPUs are planned for)."""
    indices = None if devices is None else _indices(devices)
    if indices is None:
        return gpus
    by_index = {gpu.index: gpu for gpu in gpus}
    chosen = []
    for index in indices:
        if index not in by_index:
            break  # CUDA ignores the rest of the list after an invalid index
        chosen.append(by_index[index])
    return chosen


def _indices(devices: str) -> list[int] | None:
    """CUDA_VISIBLE_DEVICES's entries as indices; None where one is a UUID or MIG name."""
    names = [d.strip() for d in devices.split(",") if d.strip()]
    return [int(name) for name in names] if all(name.isdigit() for name in names) else None


def _all_gpus() -> list[GpuFacts]:
    try:
        return _nvml_gpus()
    except Exception:  # no pynvml, no driver, no GPU: all mean "ask nvidia-smi"
        pass
    if shutil.which("nvidia-smi") is None:
        return []
    query = (
        "--query-gpu=name,memory.total,memory.free,compute_cap,pcie.link.gen.max,"
        "pcie.link.width.max"
    )
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
    for index, line in enumerate(out.strip().splitlines()):
        name, total, free, cap, gen, width = (part.strip() for part in line.split(","))
        major, _, minor = cap.partition(".")
        link = pcie_bytes_per_s(int(gen), int(width)) if gen.isdigit() and width.isdigit() else None
        capability = (int(major), int(minor or 0))
        gpus.append(GpuFacts(name, int(total) * 2**20, int(free) * 2**20, capability, link, index))
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
            try:
                link = pcie_bytes_per_s(
                    pynvml.nvmlDeviceGetMaxPcieLinkGeneration(handle),
                    pynvml.nvmlDeviceGetMaxPcieLinkWidth(handle),
                )
            except pynvml.NVMLError:
                link = None
            gpus.append(
                GpuFacts(
                    name.decode() if isinstance(name, bytes) else str(name),
                    int(memory.total),
                    int(memory.free),
                    (int(major), int(minor)),
                    link,
                    index,
                )
            )
        return gpus
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_used(index: int = 0) -> int | None:
    """Bytes in use on the GPU of this (PCI bus order) index: the whole card, as
    nvidia-smi shows it."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        pass
    query = ["--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", str(index)]
    try:
        out = subprocess.run(
            ["nvidia-smi", *query],
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
