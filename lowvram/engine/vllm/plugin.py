"""lowvram's vLLM plugin: the vocabulary tensors under vLLM's own weight offloader.

vLLM 0.26 offloads decoder layers to host memory (`--cpu-offload-gb`, its UVA offloader)
as `make_layers` builds them, and nothing else: the input embedding and the lm_head (2 GiB
each for a 70B's 128k-row vocabulary) always stay on the GPU, and set the floor of what a
large model needs. vLLM loads this module in every process it starts (the
`vllm.general_plugins` entry point in pyproject.toml); when the plan asks for it
(`LOWVRAM_OFFLOAD_VOCAB=embed` or `embed,lm_head`), each embedding vLLM builds is handed to
the same offloader, with its own method, as it is built:

- the input embedding, built before the layers, within the `--cpu-offload-gb` budget (the
  plan counts it in): the GPU then reads the few rows a step needs over PCIe;
- the lm_head, built after every layer, on top of the budget, which would otherwise go to
  more layers first: the GPU then reads it whole over PCIe for every step's logits.

Nothing of vLLM's offloading is copied here: the offloader's `_maybe_offload_to_cpu`
moves the tensors and counts them. Each moved tensor is logged on one line (`MARK`), which
the supervisor checks against the plan. Where vLLM's internals differ from 0.26's (no such
classes, an offloader without that method), it does nothing and says so in one warning.
Importing this module without vLLM is harmless: vLLM is imported by `register()` only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

ENV = "LOWVRAM_OFFLOAD_VOCAB"
"""Which tensors to move: a comma-separated subset of `embed`, `lm_head` (plan.py sets it)."""
MARK = "lowvram plugin: offloaded"
"""Starts each line saying what moved: `... offloaded embed: 1.957 GiB to host memory`."""
UNCHANGED = "lowvram plugin: nothing offloaded"
"""Starts the warning of a plugin that could not do what the plan asked."""
KINDS = ("embed", "lm_head")

# vLLM's loggers print in its processes; a logger outside its tree would stay silent.
logger = logging.getLogger("vllm.lowvram_plugin")


def wanted(value: str) -> frozenset[str]:
    """The kinds a LOWVRAM_OFFLOAD_VOCAB value asks for (unknown words are ignored)."""
    return frozenset(part.strip() for part in value.split(",")) & frozenset(KINDS)


def register() -> None:
    """vLLM's entry point: install the hook if the plan asked for it, else do nothing."""
    kinds = wanted(os.environ.get(ENV, ""))
    if not kinds:
        return
    try:
        from vllm.model_executor.layers import vocab_parallel_embedding as vocab
        from vllm.model_executor.offloader import base
    except ImportError as exc:
        logger.warning("%s: this vLLM lacks what it hooks (%s)", UNCHANGED, exc)
        return
    embedding = getattr(vocab, "VocabParallelEmbedding", None)
    lm_head = getattr(vocab, "ParallelLMHead", None)
    get_offloader = getattr(base, "get_offloader", None)
    if embedding is None or lm_head is None or get_offloader is None:
        logger.warning("%s: this vLLM has no VocabParallelEmbedding/get_offloader", UNCHANGED)
        return
    install(embedding, lm_head, get_offloader, kinds)


def install(
    embedding: type[Any],
    lm_head: type[Any],
    get_offloader: Callable[[], Any],
    kinds: frozenset[str],
) -> None:
    """Hand every new `embedding` (and `lm_head`, its subclass) of `kinds` to the
    offloader as it is built. Idempotent: vLLM may load a plugin more than once."""
    if getattr(embedding, "_lowvram_hooked", False):
        return
    build = embedding.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        build(self, *args, **kwargs)  # the weight exists once this returns
        kind = "lm_head" if isinstance(self, lm_head) else "embed"
        if kind in kinds:
            offload(self, kind, get_offloader())

    embedding.__init__ = __init__
    embedding._lowvram_hooked = True


def offload(module: Any, kind: str, offloader: Any) -> int:
    """Move `module`'s weights with vLLM's UVA offloader; return the bytes it moved."""
    move = getattr(offloader, "_maybe_offload_to_cpu", None)
    if move is None or not hasattr(offloader, "cpu_offload_max_bytes"):
        logger.warning(
            "%s: vLLM's offloader is %s, not the UVA one with --cpu-offload-gb; the %s "
            "stays on the GPU",
            UNCHANGED,
            type(offloader).__name__,
            kind,
        )
        return 0
    if not getattr(offloader, "uva_offloading", False):
        # Without UVA vLLM moves weights in forward(), which an lm_head never runs.
        logger.warning("%s: UVA is off here; the %s stays on the GPU", UNCHANGED, kind)
        return 0
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    before = offloader.cpu_offload_bytes
    if kind == "lm_head":
        # Built after every layer: the budget was theirs; the lm_head goes on top of it.
        offloader.cpu_offload_max_bytes = max(offloader.cpu_offload_max_bytes, before + size)
    move(module)
    moved = int(offloader.cpu_offload_bytes - before)
    if moved:
        logger.info("%s %s: %.3f GiB to host memory", MARK, kind, moved / 1024**3)
    else:
        logger.warning("%s: the --cpu-offload-gb budget left no room for the %s", UNCHANGED, kind)
    return moved
