"""`lowvram plan`: what the planner would run, without a GPU (what-if planning)."""

from __future__ import annotations

import argparse


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="HF directory (config.json is enough) or Hub id")
    parser.add_argument("--vram", required=True, help="VRAM budget, e.g. 6GiB")
    parser.add_argument("--context", type=int, help="wanted context length (tokens)")
    parser.add_argument("--concurrency", type=int, help="wanted concurrent sequences")
    parser.add_argument("--gpu-memory", help="the GPU's total memory (default: this machine's)")
    parser.add_argument("--host-memory", help="the host's RAM (default: this machine's)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: argparse.Namespace) -> int:
    raise NotImplementedError
