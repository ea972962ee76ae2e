"""The GPU suite's Markdown report: its records (`gpu_suite`) as the tables BENCHMARKS.md holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_report(records: list[dict[str, Any]], path: Path) -> None:
    path.write_text("\n".join(report_lines(records)) + "\n")


def report_lines(records: list[dict[str, Any]]) -> list[str]:
    env = next((r for r in records if r["section"] == "environment"), {})
    lines = ["# GPU suite report", ""]
    if env:
        lines += [
            f"{env['device']}; torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}), timm {env['timm']}, "
            f"Python {env['python']}; commit {env['commit']}; {env['date']}"
            + ("; **quick mode: a miniature on a tiny model, nothing here is a measurement**" if env["quick"] else ""),
            "",
        ]
    lines += correctness_table([r for r in records if r["section"] == "correctness"])
    throughput = [r for r in records if r["section"] == "throughput"]
    lines += speed_table("Training step (ours vs timm, same loop, interleaved)", throughput, "step")
    lines += speed_table("Inference (the paper's Table 12 setting)", throughput, "eval")
    lines += batch_table([r for r in throughput if "largest_micro_batch" in r or r["name"].startswith("largest")])
    lines += hours_table([r for r in records if r["section"] == "gpu_hours"])
    carried = [f"{r['section']}/{r['name']}" for r in records if r.get("carried_over")]
    if carried:
        lines += [f"Carried over from an earlier run (`--continue-from`), not run again: {', '.join(carried)}.", ""]
    not_run = [r for r in records if r["status"] in ("skipped", "error")]
    if not_run:
        lines += ["## Not run or broken", "", "| item | status | why |", "|---|---|---|"]
        lines += [f"| {r['section']}/{r['name']} | {r['status']} | {r.get('reason', '')} |" for r in not_run]
        lines.append("")
    return lines


def correctness_table(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    lines = ["## Correctness on the device", "", "| check | status | measured | tolerance |", "|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {r['status']} | {measured(r)} | {tolerance(r)} |")
    return [*lines, ""]


def measured(r: dict[str, Any]) -> str:
    if "grad_cosine" in r:
        worst = min(r["grad_cosine"], key=r["grad_cosine"].get)
        return (
            f"loss {r['loss']:.5f} vs {r['loss_reference']:.5f} (rel {r['loss_rel_diff']:.1e}); lowest gradient "
            f"cosine {r['grad_cosine'][worst]:.6f} ({worst}); update cosine {r['update_cosine']:.5f}; "
            f"max weight diff {r['weight_max_abs_diff'] / r['lr']:.2f} lr"
        )
    if "logit_cosine_min" in r:
        return (
            f"lowest per-image cosine {r['logit_cosine_min']:.6f}; max diff {r['logit_rel_max_diff']:.2e} of "
            f"max logit; top-1 agreement {r['top1_agreement']:.1%}"
        )
    if "normalize_max_abs_diff" in r:
        mix = r["mixup_max_abs_diff"]
        return (
            f"normalise max diff {r['normalize_max_abs_diff']:.1e}; erasing: same pixels erased in "
            f"{r['erased_images']} images: {r['checks']['erasing']}; Mixup/CutMix max diff "
            + ("(off)" if mix is None else f"{mix:.1e}")
        )
    if "weight_rel_diff" in r:
        return (
            f"{r['steps']} steps, killed after step {r['killed_after_step']}, resumed at step "
            f"{r['resumed_at_step']}: final weights rel diff "
            f"{r['weight_rel_diff']:.2e} (two uninterrupted runs: {r['noise_floor_rel_diff']:.2e})"
        )
    return r.get("summary", r.get("reason", ""))


def tolerance(r: dict[str, Any]) -> str:
    if "tolerances" in r:
        return ", ".join(f"{k} {v:g}" for k, v in r["tolerances"].items())
    if "tolerance" in r:
        return f"rel diff <= {r['tolerance']:.1e}"
    return ""


def speed_table(title: str, records: list[dict[str, Any]], mode: str) -> list[str]:
    rows = [r for r in records if r.get("mode") == mode or r["name"].startswith(f"{mode} ")]
    if not rows:
        return []
    lines = [
        f"## {title}",
        "",
        "| model | precision | compiled | batch | ours img/s | timm img/s | ours/timm | MFU ours | MFU timm | peak GB ours | peak GB timm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["status"] != "measured":
            lines.append(f"| {r['name']} | {r['status']} | | | | | | | | | |")
            continue
        ours, timm = r["ours"], r["timm"]
        lines.append(
            f"| {r['model']} | {r['precision']} | {'yes' if r['compiled'] else 'no'} | {r['batch']} "
            f"| {ours['images_per_sec']:,.0f} | {timm['images_per_sec']:,.0f} | {r['ours_over_timm']:.3f} "
            f"| {percent(ours['mfu'])} | {percent(timm['mfu'])} | {gb(ours['peak_mem_gb'])} | {gb(timm['peak_mem_gb'])} |"
        )
    return [*lines, ""]


def batch_table(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return []
    lines = [
        "## Largest training micro-batch (the training precision, channels-last, eager, one step)",
        "",
        "| model | largest micro-batch | peak GB there |",
        "|---|---|---|",
    ]
    for r in records:
        if r["status"] != "measured":
            lines.append(f"| {r['name']} | {r['status']} | |")
            continue
        at = [p["peak_mem_gb"] for p in r["probes"] if p["batch"] == r["largest_micro_batch"] and p["fits"]]
        cap = " (the search's cap)" if r["capped"] else ""
        lines.append(f"| {r['model']} | {r['largest_micro_batch']}{cap} | {gb(at[0] if at else None)} |")
    return [*lines, ""]


def hours_table(records: list[dict[str, Any]]) -> list[str]:
    measured_rows = [row for r in records if r["status"] == "measured" for row in r["rows"]]
    if not measured_rows:
        return []
    lines = [
        "## GPU-hours for 300 epochs of ImageNet-1K (training step only; one GPU, divide by N for N at best)",
        "",
        "| model | images/s (ours, fastest setting) | GPU-hours |",
        "|---|---|---|",
    ]
    for row in measured_rows:
        if row["gpu_hours"] is None:
            lines.append(f"| {row['model']} | not measured | – |")
        else:
            setting = "compiled" if row["compiled"] else "eager"
            lines.append(f"| {row['model']} | {row['images_per_sec']:,.0f} ({setting}) | {row['gpu_hours']:,.0f} |")
    return [*lines, ""]


def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def gb(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"
