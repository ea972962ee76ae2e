"""The suite's command line and its runner: items in order, under the time budget, each recorded
as it ends (see the package's docstring)."""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch

from convnext_train import bench, measure
from convnext_train.errors import UserError, exit_on_user_error
from convnext_train.gpu_suite import __doc__ as SUITE_DOC
from convnext_train.gpu_suite.checks import check_batch_augment, check_inference, check_training_step
from convnext_train.gpu_suite.plan import REPO, Plan, release_device_memory
from convnext_train.gpu_suite.report import write_report
from convnext_train.gpu_suite.runs import cuda_tests_item, resume_item
from convnext_train.gpu_suite.throughput import gpu_hours_item, largest_batch_item, throughput_item
from convnext_train.runtime import prepare_device

# First guesses of an item's cost on an H100/H200-class node, replaced by what items of the same
# kind took once one has run (seconds, compile included).
FIRST_GUESS = {"check": 90, "resume": 120, "tests": 60, "eager": 30, "compiled": 150, "search": 60, "free": 0}


class Suite:
    def __init__(
        self,
        out: Path,
        plan: Plan,
        budget_minutes: float,
        earlier: dict[tuple[str, str], dict[str, Any]] | None = None,
    ):
        self.out, self.plan = out, plan
        self.earlier = earlier or {}
        self.deadline = time.monotonic() + 60 * budget_minutes
        self.spent: dict[str, float] = {}  # the slowest item of each kind so far
        self.records: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        (out / "suite.jsonl").write_text("")

    def run(self, section: str, name: str, kind: str, work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        record: dict[str, Any] = {"section": section, "name": name}
        estimate = self.spent.get(kind, FIRST_GUESS[kind] if not self.plan.quick else 0)
        left = self.deadline - time.monotonic()
        if (section, name) in self.earlier:
            record = self.earlier[section, name] | {"carried_over": True}
        elif kind != "free" and estimate > left:
            record |= {
                "status": "skipped",
                "reason": f"time budget: about {estimate:.0f} s needed, {max(left, 0):.0f} s left",
            }
        else:
            started = time.monotonic()
            try:
                record |= work()
            except torch.cuda.OutOfMemoryError as error:
                record |= {"status": "error", "reason": f"out of memory: {str(error).splitlines()[0]}"}
            except Exception as error:  # noqa: BLE001 - one broken item must not cost the others
                record |= {"status": "error", "reason": f"{type(error).__name__}: {str(error).strip()[:500]}"}
            record["seconds"] = time.monotonic() - started
            self.spent[kind] = max(self.spent.get(kind, 0), record["seconds"])
            release_device_memory()
        self.record(record)
        carried = " carried over" if record.get("carried_over") else ""
        print(f"[{section}] {name}: {record['status']}{carried} ({record.get('seconds', 0):.1f} s)", flush=True)
        return record

    def record(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with (self.out / "suite.jsonl").open("a") as file:
            file.write(json.dumps(record) + "\n")
        write_report(self.records, self.out / "report.md")


def environment(device: torch.device, plan: Plan) -> dict[str, Any]:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {
        "section": "environment",
        "name": "environment",
        "status": "measured",
        "device": measure.device_name(device),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "timm": timm.__version__,
        "commit": commit or None,
        "quick": plan.quick,
    }


def correctness_config(plan: Plan, device: torch.device):
    variant = plan.train_variants[0]
    cfg, _ = bench.compose_config(
        "step",
        [
            *plan.overrides(variant, plan.check_batch, "bf16", plan.compile[-1], device),
            "model.drop_path_rate=0",  # each device draws its own: off for the comparison
            "scheduler.warmup_epochs=0",  # the first step at the peak lr, not at 0
        ],
    )
    return cfg


SECTIONS = ("correctness", "throughput", "gpu_hours")


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convnext_train.gpu_suite", description=SUITE_DOC.splitlines()[0])
    parser.add_argument("out", type=Path, help="directory for suite.jsonl and report.md")
    parser.add_argument("--quick", action="store_true", help="tiny model, few steps, eager: checks the suite itself")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="wall time for the items (default 8)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument(
        "--continue-from",
        type=Path,
        help="an earlier run's suite.jsonl: what it passed or measured is carried over, not run again",
    )
    args = parser.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if unknown := [s for s in sections if s not in SECTIONS]:
        raise UserError(f"--only {','.join(unknown)}: the sections are {', '.join(SECTIONS)}")
    device = prepare_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.quick:
        raise UserError("no CUDA device is visible: the suite measures a GPU; --quick runs it in miniature on the CPU")
    plan = Plan.quick_plan() if args.quick else Plan(quick=False)
    suite = Suite(args.out, plan, args.budget_minutes, earlier=read_earlier(args.continue_from, plan))
    suite.record(environment(device, plan))
    for section, name, kind, work in items(suite, plan, device):
        if section in sections:
            suite.run(section, name, kind, work)
    failed = [f"{r['section']}/{r['name']}" for r in suite.records if r["status"] in ("failed", "error")]
    print(f"report: {args.out / 'report.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def read_earlier(path: Path | None, plan: Plan) -> dict[tuple[str, str], dict[str, Any]]:
    """The items an earlier run passed or measured, by (section, name); none from another plan."""
    if path is None:
        return {}
    try:
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"--continue-from {path}: not a suite.jsonl the suite wrote ({error})") from error
    env = next((r for r in records if r.get("section") == "environment"), None)
    if env is None or env.get("quick") != plan.quick:
        raise UserError(f"--continue-from {path}: written by a {'full' if plan.quick else 'quick'} run, not this one")
    return {
        (r["section"], r["name"]): r
        for r in records
        if r.get("status") in ("passed", "measured") and r.get("section") not in ("environment", "gpu_hours")
    }


def items(suite: Suite, plan: Plan, device: torch.device) -> list[tuple[str, str, str, Callable[[], dict[str, Any]]]]:
    """Every item, in the order the loan should buy them: the device's step and logits against
    the CPU, ConvNeXt-T's training step and inference (the targets), the resume and the CUDA tests,
    then the rest of the tables, the memory search, and the GPU-hours from whatever was measured."""
    cfg = correctness_config(plan, device)
    half, tf32 = plan.precisions
    first, *others = plan.train_variants

    def speed(mode: str, variant: str, precision: str, compiled: bool):
        kind = "compiled" if compiled else "eager"
        work = lambda: throughput_item(plan, mode, variant, precision, compiled, device)  # noqa: E731
        return ("throughput", f"{mode} {variant} {precision} {kind}", kind, work)

    return [
        ("correctness", "training step", "check", lambda: check_training_step(cfg, device)),
        ("correctness", "inference logits", "check", lambda: check_inference(cfg, device)),
        ("correctness", "batch augmentations", "eager", lambda: check_batch_augment(cfg, device)),
        *(speed("step", first, half, compiled) for compiled in plan.compile),
        *(speed("eval", plan.eval_variants[0], half, compiled) for compiled in plan.compile),
        ("correctness", "killed and resumed", "resume", lambda: resume_item(plan, device, suite.out)),
        ("correctness", "CUDA-only tests", "tests", lambda: cuda_tests_item(device)),
        *(speed("step", variant, half, compiled) for variant in others for compiled in plan.compile),
        *(speed("eval", variant, half, compiled) for variant in plan.eval_variants[1:] for compiled in plan.compile),
        *(speed("eval", variant, tf32, compiled) for variant in plan.eval_variants for compiled in plan.compile),
        *(
            (
                "throughput",
                f"largest micro-batch {variant}",
                "search",
                lambda v=variant: largest_batch_item(plan, v, device),
            )
            for variant in plan.search_variants
        ),
        ("gpu_hours", "300 epochs", "free", lambda: gpu_hours_item(suite.records, plan)),  # arithmetic: always
    ]
