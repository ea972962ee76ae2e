"""The GPU suite before a GPU: its quick mode runs every section on the CPU (nothing timed is
asserted), its checks fail where the device's step goes wrong, and its budget skips what would not
fit, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from convnext_train.bench import compose_config
from convnext_train.gpu_suite import cli, runs, throughput
from convnext_train.gpu_suite.checks import check_training_step
from convnext_train.gpu_suite.plan import Plan

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "2"}
QUICK_ITEMS = [
    ("environment", "environment"),
    ("correctness", "training step"),
    ("correctness", "inference logits"),
    ("correctness", "batch augmentations"),
    ("throughput", "step convnext_atto fp32 eager"),
    ("throughput", "eval convnext_atto fp32 eager"),
    ("correctness", "killed and resumed"),
    ("correctness", "CUDA-only tests"),
    ("throughput", "eval convnext_atto tf32 eager"),
    ("throughput", "largest micro-batch convnext_atto"),
    ("gpu_hours", "300 epochs"),
]


def read_records(out: Path) -> dict[tuple[str, str], dict]:
    lines = (out / "suite.jsonl").read_text().splitlines()
    return {(r["section"], r["name"]): r for r in map(json.loads, lines)}


# What the GPU machine's Python lacks beyond the offline wheels (hydra-core, omegaconf, wandb,
# submitit, pytest): the suite, train.py and the CUDA tests' conftest must not need them.
NOT_ON_THE_GPU_MACHINE = ["sklearn", "matplotlib", "datasets", "webdataset", "ffcv", "scipy", "transformers", "skimage"]


def without_packages(directory: Path, names: list[str]) -> dict[str, str]:
    """An environment in which importing any of `names` raises ImportError (a package of that name
    first on PYTHONPATH that refuses to load)."""
    for name in names:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    return {**ENV, "PYTHONPATH": os.pathsep.join([str(directory), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_the_quick_suite_runs_every_section_and_reports_it(tmp_path):
    out = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "convnext_train.gpu_suite", str(out), "--quick"],
        cwd=REPO,
        env=without_packages(tmp_path / "absent", NOT_ON_THE_GPU_MACHINE),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = read_records(out)
    assert list(records) == QUICK_ITEMS
    env = records["environment", "environment"]
    assert env["quick"] is True and env["torch"] == torch.__version__

    # Correctness: the CPU's bf16 step and logits against its fp32 ones, within the stated bounds.
    step = records["correctness", "training step"]
    assert step["status"] == "passed" and all(step["checks"].values())
    assert set(step["grad_cosine"]) == {"stem", "stage1", "stage2", "stage3", "stage4", "head"}
    assert step["weight_max_abs_diff"] <= 2.1 * step["lr"] and step["loss_rel_diff"] < 1e-2
    assert records["correctness", "inference logits"]["status"] == "passed"
    augment = records["correctness", "batch augmentations"]
    assert augment["status"] == "passed" and augment["erased_images"] > 0
    resume = records["correctness", "killed and resumed"]
    assert resume["status"] == "passed", resume
    assert 2 <= resume["killed_after_step"] < 6 and resume["resumed_at_step"] == resume["killed_after_step"]
    assert resume["weight_rel_diff"] == 0.0  # the CPU resumes bitwise
    assert not (out / "resume").exists()  # the runs' checkpoints are not left in the report
    cuda_tests = records["correctness", "CUDA-only tests"]
    assert cuda_tests["status"] == "skipped" and cuda_tests["counts"].get("skipped", 0) >= 1

    # Throughput: ours and timm's, each measured; the ratio and the GPU-hours follow from the rates.
    for name in ("step convnext_atto fp32 eager", "eval convnext_atto fp32 eager", "eval convnext_atto tf32 eager"):
        row = records["throughput", name]
        assert row["status"] == "measured" and row["gmacs_per_image"] > 0
        assert row["ours"]["images_per_sec"] > 0 and row["timm"]["images_per_sec"] > 0
        assert row["ours_over_timm"] == pytest.approx(row["ours"]["images_per_sec"] / row["timm"]["images_per_sec"])
        assert row["ours"]["mfu"] is None  # no known peak on a CPU
    search = records["throughput", "largest micro-batch convnext_atto"]
    assert search["capped"] and search["largest_micro_batch"] == 16
    assert [p["batch"] for p in search["probes"]] == [8, 16] and all(p["fits"] for p in search["probes"])
    rate = records["throughput", "step convnext_atto fp32 eager"]["ours"]["images_per_sec"]
    (hours,) = records["gpu_hours", "300 epochs"]["rows"]
    assert hours["gpu_hours"] == pytest.approx(300 * 1_281_167 / rate / 3600)

    report = (out / "report.md").read_text()
    for heading in ("## Correctness on the device", "## Training step", "## Inference", "## Largest", "## GPU-hours"):
        assert heading in report, heading
    assert "quick mode" in report and "| CUDA-only tests | skipped |" in report
    assert "| convnext_atto | tf32 | no | 8 |" in report

    # A later loan continues this report: what passed or was measured is carried over, not rerun.
    again = tmp_path / "again"
    earlier = out / "suite.jsonl"
    assert cli.main([str(again), "--quick", "--budget-minutes", "0", "--continue-from", str(earlier)]) == 0
    carried = read_records(again)
    assert list(carried) == QUICK_ITEMS
    for key, record in records.items():
        if key[0] not in ("environment", "gpu_hours") and record["status"] in ("passed", "measured"):
            assert carried[key] == record | {"carried_over": True}, key
    assert carried["correctness", "CUDA-only tests"]["status"] == "skipped"  # not carried: tried again, no time
    assert carried["gpu_hours", "300 epochs"]["rows"] == records["gpu_hours", "300 epochs"]["rows"]
    assert "Carried over from an earlier run" in (again / "report.md").read_text()


def test_the_step_check_fails_when_the_two_steps_differ():
    """Drop path draws its masks from each side's own generator: left on, the two steps drop
    different blocks, which the gradient check must catch (and is why the suite turns it off)."""
    overrides = [
        "model=convnext_atto",
        "data.img_size=32",
        "data.num_classes=10",
        "trainer.micro_batch_size=4",
        "trainer.device=cpu",
        "trainer.precision=fp32",
        "scheduler.warmup_epochs=0",
    ]
    same, _ = compose_config("step", [*overrides, "model.drop_path_rate=0"])
    assert check_training_step(same, torch.device("cpu"))["status"] == "passed"
    # Layer scale at 1 rather than 1e-6: the blocks' branches count from the first step on.
    dropped, _ = compose_config("step", [*overrides, "model.drop_path_rate=0.5", "model.layer_scale_init_value=1.0"])
    result = check_training_step(dropped, torch.device("cpu"))
    assert result["status"] == "failed" and not result["checks"]["gradients"], result
    assert min(result["grad_cosine"].values()) < 0.99
    assert result["checks"]["same_start"]  # the same weights went in: the difference is the step's


def test_the_budget_skips_what_would_not_fit_and_says_so(tmp_path, capsys):
    out = tmp_path / "report"
    assert cli.main([str(out), "--quick", "--budget-minutes", "0", "--only", "throughput,gpu_hours"]) == 0
    records = read_records(out)
    skipped = [r for r in records.values() if r["section"] == "throughput"]
    assert [r["name"] for r in skipped] == [name for section, name in QUICK_ITEMS if section == "throughput"]
    assert all(r["status"] == "skipped" and r["reason"].startswith("time budget") for r in skipped)
    (hours,) = records["gpu_hours", "300 epochs"]["rows"]  # arithmetic, always done: nothing to work from
    assert hours["gpu_hours"] is None
    assert "## Not run or broken" in (out / "report.md").read_text()


def test_bad_arguments_get_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(tmp_path), "--quick", "--only", "speed"])
    assert exit_info.value.code != 0
    assert "--only speed: the sections are correctness, throughput, gpu_hours" in capsys.readouterr().err
    not_a_report = tmp_path / "notes.txt"
    not_a_report.write_text("measured 3000 img/s\n")
    with pytest.raises(SystemExit):
        cli.main([str(tmp_path), "--quick", "--continue-from", str(not_a_report)])
    assert "not a suite.jsonl the suite wrote" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            cli.main([str(tmp_path)])
        assert "no CUDA device is visible" in capsys.readouterr().err


def test_the_batch_search_brackets_the_limit_to_a_multiple_of_16(monkeypatch):
    """The search's arithmetic against a stand-in memory limit (no CPU runs out of memory)."""
    probed = []

    def fits_below_1000(_plan, _variant, batch, _device):
        probed.append(batch)
        return batch <= 1000, None

    monkeypatch.setattr(throughput, "fits", fits_below_1000)
    plan = Plan(quick=False)
    result = throughput.largest_batch_item(plan, "convnext_t", torch.device("cpu"))
    assert result["largest_micro_batch"] == 992 and not result["capped"]
    assert probed == [128, 256, 512, 1024, 768, 896, 960, 992, 1008]


def test_gpu_hours_come_from_the_fastest_measured_step():
    records = [
        {
            "section": "throughput",
            "mode": "step",
            "model": "convnext_t",
            "status": "measured",
            "compiled": False,
            "ours": {"images_per_sec": 2000.0},
        },
        {
            "section": "throughput",
            "mode": "step",
            "model": "convnext_t",
            "status": "measured",
            "compiled": True,
            "ours": {"images_per_sec": 3000.0},
        },
        {"section": "throughput", "mode": "step", "model": "convnext_s", "status": "skipped"},
    ]
    rows = throughput.gpu_hours_item(records, Plan(quick=False))["rows"]
    t, s, b = rows
    # 300 epochs x 1,281,167 images = 384,350,100 images; at 3,000 images/s: 128,116.7 s = 35.588 h.
    assert t["compiled"] is True and t["gpu_hours"] == pytest.approx(35.588, abs=1e-3)
    assert s["gpu_hours"] is None and b["gpu_hours"] is None


@pytest.mark.slow
def test_every_item_of_the_full_plan_composes_a_valid_config():
    """The GPU plan cannot run here, but its configs can be checked: a rejected override would
    otherwise cost a loan's item (or all of them, at the correctness step)."""
    plan, cuda = Plan(quick=False), torch.device("cuda")
    settings = [(mode, v) for mode in ("step", "eval") for v in {*plan.train_variants, *plan.eval_variants}]
    settings += [("step", v) for v in plan.search_variants]
    for mode, variant in settings:
        batch = plan.train_batch if mode == "step" else plan.eval_batch
        for precision in ("bf16", "fp32"):
            for compiled in plan.compile:
                cfg, name = compose_config(mode, plan.overrides(variant, batch, precision, compiled, cuda))
                assert name == variant and cfg.trainer.micro_batch_size == batch and cfg.trainer.device == "cuda"
    checked = cli.correctness_config(plan, cuda)
    assert checked.model.drop_path_rate == 0 and checked.trainer.compile and checked.trainer.precision == "bf16"
    resumed, _ = compose_config("loader", runs.resume_overrides(plan, cuda))  # train.py's config, data= kept
    assert resumed.data.kind == "synthetic" and resumed.data.train_length == 30 * plan.check_batch
