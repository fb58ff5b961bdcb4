"""`lowvram plan`: what the planner would run, without a GPU (what-if planning)."""

from __future__ import annotations

import argparse
import json
import sys

from engine.facts import FactsError, GpuFacts, HostFacts, detect_gpus, detect_host, load_model_facts
from engine.plan import EnginePlan
from engine.planner import PlanError, PlanRequest, plan_vllm
from engine.units import gib, parse_size


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF directory (config.json is enough) or Hub id")
    parser.add_argument("--vram", required=True, help="VRAM budget, e.g. 6GiB")
    parser.add_argument("--context", type=int, help="wanted context length (tokens)")
    parser.add_argument("--concurrency", type=int, help="wanted concurrent sequences")
    parser.add_argument("--gpu-memory", help="the GPU's total memory (default: this machine's)")
    parser.add_argument("--host-memory", help="the host's RAM (default: this machine's)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    try:
        plan = plan_from_args(args)
    except (FactsError, PlanError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(
            json.dumps(
                plan.model_dump(mode="json") | {"argv": plan.to_argv(), "env": plan.to_env()},
                indent=2,
            )
        )
    else:
        print(plan.explain())
    return 0


def plan_from_args(args: argparse.Namespace) -> EnginePlan:
    model = load_model_facts(args.model)
    gpus = detect_gpus()
    if args.gpu_memory:
        total = parse_size(args.gpu_memory)
        # What-if: a card of that size with nothing else on it.
        gpu = GpuFacts(
            f"{gib(total)} GPU", total, total, gpus[0].compute_capability if gpus else (0, 0)
        )
    elif gpus:
        gpu = gpus[0]
    else:
        raise PlanError("no NVIDIA GPU found here: pass --gpu-memory (e.g. 24GiB) to plan for one")
    if args.host_memory:
        ram = parse_size(args.host_memory)
        host = HostFacts(ram, ram)
    else:
        host = detect_host()
    request = PlanRequest(
        vram=parse_size(args.vram), context=args.context, concurrency=args.concurrency
    )
    return plan_vllm(model, gpu, host, request)
