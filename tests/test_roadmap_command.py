"""`python -m convnext_train.roadmap`: the roadmap's table and figure (ConvNeXt paper, Figure 2; appendix C,
Tables 10 and 11). Each row is counted from its step's config, the paper's columns come from the registry,
your top-1 from run directories written as the trainer writes them (its RunLogger, its `.hydra/` record),
and the command writes a real PNG, or, given bad input, one line and exit code 2 and nothing at all."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_scripts
from omegaconf import OmegaConf
from PIL import Image

from convnext_train import configs
from convnext_train.command_record import SUBDIR
from convnext_train.configs import CONFIG_DIR
from convnext_train.errors import USER_ERROR_EXIT_CODE, UserError
from convnext_train.metrics import METRICS_FILE, RunLogger
from convnext_train.models.complexity import count_gmacs, count_params
from convnext_train.roadmap import (
    DPI,
    R50,
    R200,
    REGIMES,
    Row,
    Speed,
    Yours,
    draw,
    find_runs,
    format_table,
    table_rows,
    write_figure,
    yours_by_step,
)


# --------------------------------------------------------------------------------------------------
# Run directories as the trainer leaves them
# --------------------------------------------------------------------------------------------------
def write_run(run_dir: Path, model: str, top1s: list[float], *, finished: bool, torn_line: bool = False) -> Path:
    """A run of `model=` that evaluated once per epoch with these top-1s: metrics.jsonl and summary.json
    through the trainer's RunLogger with the trainer's rows, and `.hydra/` as CommandRecord writes it
    (`OmegaConf.to_yaml` of the composed train config and of its `hydra` node)."""
    (run_dir / SUBDIR).mkdir(parents=True)
    for name, text in command_record(model).items():
        (run_dir / SUBDIR / f"{name}.yaml").write_text(text)
    logger = RunLogger(run_dir, {"name": "none"}, config={})
    steps_per_epoch = 10
    for epoch, top1 in enumerate(top1s, start=1):
        step = epoch * steps_per_epoch
        logger.log({"step": step, "epoch": float(epoch), "lr": 1e-3, "loss": 6.0, "images_per_sec": 100.0})
        logger.log({"step": step, "epoch": epoch, "val_images": 50000, "top1": top1, "top5": 95.0, "val_loss": 1.0})
    if finished:
        logger.write_summary(
            {
                "epochs": len(top1s),
                "steps": len(top1s) * steps_per_epoch,
                "top1": top1s[-1],
                "top5": 95.0,
                "best_top1": max(top1s),
                "wall_seconds": 1.0,
                "train_seconds": 1.0,
                "images_per_sec": 100.0,
                "skipped_images": 0,
                "class_names": ["a", "b"],
            }
        )
    logger.close()
    if torn_line:  # killed in the middle of a write: a last line without its newline
        with (run_dir / METRICS_FILE).open("a") as file:
            file.write('{"step": 99, "epoch": 9, "top1": 99.9')
    return run_dir


@functools.cache  # composing train.py's config takes a few tenths of a second; seeds share their model's
def command_record(model: str) -> dict[str, str]:
    cfg = configs.compose_train([f"model={model}", "logger=none"])
    return {
        "config": OmegaConf.to_yaml({key: value for key, value in cfg.items() if key != "hydra"}),
        "hydra": OmegaConf.to_yaml(OmegaConf.create({"hydra": cfg.hydra})),
        "overrides": OmegaConf.to_yaml([f"model={model}", "logger=none"]),
    }


@pytest.fixture(scope="module")
def runs(module_tmp_path) -> Path:
    """Laid out as `experiment=roadmap` sweeps lay them out (outputs/roadmap/<override_dirname>, whose
    model=roadmap_r50/<step> makes a subfolder), with seeds, other models and other regimes."""
    root = module_tmp_path / "roadmap"
    sweep = root / "experiment=roadmap,model=roadmap_r50"
    for seed, best in enumerate((80.0, 80.3, 80.6)):  # three seeds of one step, finished
        write_run(sweep / f"gelu,trainer.seed={seed}", "roadmap_r50/gelu", [70.0, best, best - 0.2], finished=True)
    # Still training: its best so far, not its last evaluation (nor the torn line after it).
    write_run(sweep / "kernel_7", "roadmap_r50/kernel_7", [70.0, 75.5, 74.0], finished=False, torn_line=True)
    # One seed finished, one not: the mean of both, marked.
    write_run(sweep / "fewer_activations,trainer.seed=0", "roadmap_r50/fewer_activations", [81.0], finished=True)
    write_run(sweep / "fewer_activations,trainer.seed=1", "roadmap_r50/fewer_activations", [80.0], finished=False)
    write_run(sweep / "fewer_norms", "roadmap_r50/fewer_norms", [], finished=False)  # not evaluated yet
    write_run(root / "experiment=roadmap,model=roadmap_r200" / "gelu", "roadmap_r200/gelu", [82.5], finished=True)
    write_run(root / "model=convnext_t", "convnext_t", [82.1], finished=True)
    (root / "notes").mkdir()  # not a run: no .hydra, no metrics.jsonl
    return root


@pytest.fixture(scope="module")
def other_models_only(module_tmp_path) -> Path:
    root = module_tmp_path / "classic"
    write_run(root / "a", "convnext_t", [82.1], finished=True)
    write_run(root / "b", "convnext_t", [82.0], finished=True)
    write_run(root / "c", "convnext_atto", [75.0], finished=False)
    return root


def meta_model(name: str) -> torch.nn.Module:
    from hydra.utils import instantiate

    with torch.device("meta"):
        return instantiate(configs.model(name)).eval()


# --------------------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("regime", list(REGIMES.values()), ids=list(REGIMES))
def test_the_registry_names_every_step_config_and_quotes_the_same_numbers_as_its_comment(regime):
    files = {path.stem: path for path in (CONFIG_DIR / "model" / regime.folder).glob("*.yaml")}
    assert sorted(step.name for step in regime.steps) == sorted(files)
    assert regime.steps[0].name in ("resnet50", "resnet200") and regime.steps[-1].name == "separate_downsampling"
    assert [step.name for step in regime.steps if step.side_branch] == ["kernel_5", "kernel_9", "kernel_11"]
    # Each config's comment quotes the paper too: the two places must agree, number for number.
    for step in regime.steps:
        top1, gflops = re.search(r"(\d+\.\d+)% top-1.*?(\d+\.\d+) GFLOPs", files[step.name].read_text(), re.S).groups()
        assert (float(top1), float(gflops)) == (step.paper_top1, step.paper_gflops), step.name


def test_the_registry_has_both_tables_endpoints():
    assert (R50.start, R50.end, R50.table, R50.original_recipe_top1) == ("ResNet-50", "ConvNeXt-T", "Table 10", 76.13)
    assert (R200.start, R200.end, R200.table, R200.original_recipe_top1) == (
        "ResNet-200",
        "ConvNeXt-B",
        "Table 11",
        78.20,
    )
    assert (R50.step("separate_downsampling").paper_top1, R200.step("separate_downsampling").paper_top1) == (
        81.97,
        83.60,
    )


# --------------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # three models composed, built and counted twice: ~4 s
def test_each_row_counts_its_steps_built_model_and_carries_the_papers_columns():
    names = ["resnet50", "kernel_9", "separate_downsampling"]
    rows = table_rows(R50, steps=list(reversed(names)))  # shown in the paper's order whatever the order asked
    assert [row.step.name for row in rows] == names
    for row in rows:
        model = meta_model(f"roadmap_r50/{row.step.name}")
        assert row.gmacs == count_gmacs(model, 224) and row.params == count_params(model)
    resnet50, kernel_9, convnext_t = rows
    # Anchors of our own: torchvision's ResNet-50 (25.56M, 4.09 GMACs) and ConvNeXt-T (28.59M, 4.46).
    assert (round(resnet50.params / 1e6, 2), round(resnet50.gmacs, 2)) == (25.56, 4.09)
    assert (round(convnext_t.params / 1e6, 2), round(convnext_t.gmacs, 2)) == (28.59, 4.46)
    assert (kernel_9.step.paper_top1, kernel_9.step.paper_gflops, kernel_9.step.side_branch) == (80.57, 4.21, True)
    assert (convnext_t.step.paper_top1, convnext_t.step.paper_gflops) == (81.97, 4.49)
    assert all(row.images_per_sec is None and row.yours is None for row in rows)


@pytest.mark.slow
def test_gmacs_follow_the_image_size():
    (row,) = table_rows(R200, img_size=64, steps=["gelu"])
    assert row.gmacs == count_gmacs(meta_model("roadmap_r200/gelu"), 64)
    assert row.gmacs < 14.81 / 10  # (224 / 64)^2 = 12x fewer


@pytest.mark.slow
def test_measuring_gives_images_per_second_for_the_rows_asked():
    speed = Speed(torch.device("cpu"), batch_size=2, precision="fp32", channels_last=True, rounds=1)
    (row,) = table_rows(R50, img_size=32, steps=["resnet50"], speed=speed)
    assert row.images_per_sec is not None and row.images_per_sec > 0


# --------------------------------------------------------------------------------------------------
# Your runs
# --------------------------------------------------------------------------------------------------
def test_your_top1_is_read_from_finished_and_unfinished_runs_and_seeds_are_averaged(runs):
    found = find_runs([runs])
    assert len(found) == 9  # the nine runs, not the folders that hold them
    yours = yours_by_step(R50, found)
    assert set(yours) == {"gelu", "kernel_7", "fewer_activations"}  # fewer_norms has not evaluated yet
    assert yours["gelu"] == Yours(pytest.approx(80.3), 3, unfinished=False)
    assert yours["kernel_7"] == Yours(75.5, 1, unfinished=True)
    assert yours["fewer_activations"] == Yours(80.5, 2, unfinished=True)
    assert (str(yours["gelu"]), str(yours["kernel_7"]), str(yours["fewer_activations"])) == (
        "80.30 (3 runs)",
        "75.50*",
        "80.50* (2 runs)",
    )
    # The other regime reads its own runs only: r50's gelu is not r200's.
    assert yours_by_step(R200, found) == {"gelu": Yours(82.5, 1, unfinished=False)}


def test_a_run_directory_itself_can_be_given(runs):
    run_dir = runs / "experiment=roadmap,model=roadmap_r50" / "kernel_7"
    assert yours_by_step(R50, find_runs([run_dir])) == {"kernel_7": Yours(75.5, 1, unfinished=True)}


def test_runs_of_other_models_only_are_refused_naming_what_was_found(other_models_only):
    with pytest.raises(UserError, match=r"none of the 3 run\(s\).*regime=r50.*convnext_atto \(1\), convnext_t \(2\)"):
        yours_by_step(R50, find_runs([other_models_only]))


def test_a_runs_path_with_no_run_or_no_path_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        find_runs([tmp_path / "missing"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no training run"):
        find_runs([tmp_path / "empty"])


def test_the_table_shows_your_top1_beside_the_papers(runs):
    yours = yours_by_step(R50, find_runs([runs]))
    text = format_table(R50, table_rows(R50, steps=["kernel_5", "kernel_7", "gelu"], yours=yours), 224)
    lines = text.splitlines()
    assert "ResNet-50 -> ConvNeXt-T" in lines[0] and "Table 10" in lines[0]
    assert lines[1].split() == (
        "step change params (M) GMACs @224 paper GFLOPs paper top-1 your top-1".split()
    )  # no images/s column unless measured
    by_step = {line.split()[0]: line for line in lines[2:5]}
    assert re.search(r"kernel 3 -> 5\s+25\.72\s+4\.10\s+4\.10\s+80\.35\s+–$", by_step["kernel_5"])
    assert re.search(r"4\.15\s+4\.15\s+80\.57\s+75\.50\*$", by_step["kernel_7"])
    assert re.search(r"4\.15\s+4\.15\s+80\.62\s+80\.30 \(3 runs\)$", by_step["gelu"])
    assert "kernel_5 †" in lines[2] and any(line.startswith("† side branch") for line in lines)
    assert any(line.startswith("* still training") for line in lines)


# --------------------------------------------------------------------------------------------------
# The figure
# --------------------------------------------------------------------------------------------------
def fake_rows(regime, yours: dict[str, Yours]) -> list[Row]:
    """Rows without building anything: the figure only draws what they hold."""
    return [Row(step, 1, step.paper_gflops - 0.01, yours=yours.get(step.name)) for step in regime.steps]


def test_the_figure_is_figure_2s_layout(tmp_path):
    rows = fake_rows(R50, {"gelu": Yours(79.0, 3, False), "kernel_9": Yours(80.1, 1, True)})
    figure = draw(R50, rows)
    (axes,) = figure.axes
    # The first step at the top: the y axis runs downward, ticks in the paper's order.
    bottom, top = axes.get_ylim()
    assert bottom > top
    labels = [label.get_text() for label in axes.get_yticklabels()]
    assert labels == [f"{step.name}\n{step.paper_gflops - 0.01:.2f} GMACs" for step in R50.steps]
    bars = list(axes.patches)
    assert len(bars) == 16 + 2  # the paper's bar per step, yours where you have it
    paper = sorted(round(bar.get_width(), 2) for bar in bars if bar.get_height() > 0.3)
    assert paper == sorted(step.paper_top1 for step in R50.steps)
    hatched = sorted(round(bar.get_width(), 2) for bar in bars if bar.get_hatch())
    assert hatched == sorted([80.35, 80.57, 80.47, 80.1])  # kernel_5, 9, 11 and your kernel_9 run
    yours = {round(bar.get_width(), 2): bar for bar in bars if bar.get_height() < 0.3}
    assert set(yours) == {79.0, 80.1}
    gelu_y = R50.steps.index(R50.step("gelu"))
    assert yours[79.0].get_y() > gelu_y - 0.5 and yours[79.0].get_y() + yours[79.0].get_height() < gelu_y + 0.5
    # From a little below the lowest value, so that tenths of a point show.
    low, high = axes.get_xlim()
    assert 76.5 <= low < 78.28 and high > 81.97
    assert "ConvNeXt-T" in axes.get_title() and "Table 10" in axes.get_title()

    out = write_figure(figure, tmp_path / "roadmap.png")
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (10 * DPI, (1.5 + 0.5 * 16) * DPI)  # 10 in wide, 1.5 in + 0.5 in a row
    assert [path.name for path in tmp_path.iterdir()] == ["roadmap.png"]  # no temporary left beside it


# --------------------------------------------------------------------------------------------------
# The command, as a user runs it
# --------------------------------------------------------------------------------------------------
MEASURED = ["measure=true", "img_size=32", "batch_size=2", "rounds=1", "precision=fp32", "device=cpu"]


@pytest.fixture(scope="module")
def commands(runs, other_models_only, module_tmp_path) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Each command once, forked from the tests' fork server (conftest.run_scripts); each writes its own out=."""
    out = module_tmp_path / "figures"
    empty = module_tmp_path / "empty"
    empty.mkdir()
    arguments = {
        "r50": [f"runs={runs}", "steps=[kernel_7,gelu]", *MEASURED],
        "r200": ["regime=r200", f"runs=[{runs}]", "steps=[gelu]"],
        "unknown regime": ["regime=r101"],
        "unknown step": ["steps=[resnet50,kernel_3]"],
        "no step": ["steps=[]"],
        "missing runs path": [f"runs={module_tmp_path / 'missing'}"],
        "no run there": [f"runs={empty}"],
        "other models only": [f"runs={other_models_only}"],
        "not a png": [],
    }
    outs = {
        name: out / name.replace(" ", "_") / f"roadmap.{'pdf' if name == 'not a png' else 'png'}" for name in arguments
    }
    results = run_scripts(
        [("convnext_train.roadmap", [*args, f"out={outs[name]}"]) for name, args in arguments.items()]
    )
    return {name: (result, outs[name]) for name, result in zip(arguments, results, strict=True)}


@pytest.mark.slow  # the fork server's imports, then two models counted and measured
def test_the_command_prints_the_table_and_writes_the_png(commands):
    result, out = commands["r50"]
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == "ResNet-50 -> ConvNeXt-T (regime=r50): ImageNet-1K, ConvNeXt paper Table 10"
    assert lines[1].split()[-4:] == ["top-1", "images/s", "your", "top-1"]
    rows = {line.split()[0]: line for line in lines[2:4]}
    assert list(rows) == ["kernel_7", "gelu"]
    for line in rows.values():  # images/s, then your top-1 or a dash
        images_per_sec = float(re.search(r"(\d+\.\d)\s+(–|\d+\.\d\d\*?(?: \(\d+ runs\))?)$", line).group(1))
        assert images_per_sec > 0
    assert rows["gelu"].endswith("80.30 (3 runs)") and rows["kernel_7"].endswith("75.50*")
    assert re.search(r"^images/s: .*batch 2, 32 px, fp32, channels-last", result.stdout, re.M)
    assert lines[-1] == f"wrote {out}"
    with Image.open(out) as image:
        assert (image.format, image.size) == ("PNG", (1000, 250))  # two rows
    # Nothing of Hydra's where it ran (the repository root): no output folder, no .hydra, no log.
    assert not (REPO / SUBDIR).exists() and not (REPO / "roadmap.log").exists()


@pytest.mark.slow
def test_the_r200_regime_reads_its_own_runs(commands):
    result, out = commands["r200"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ResNet-200 -> ConvNeXt-B" in result.stdout and "Table 11" in result.stdout
    (gelu,) = [line for line in result.stdout.splitlines() if line.startswith("gelu ")]
    assert re.search(r"14\.81\s+14\.81\s+82\.19\s+82\.50$", gelu)  # r200's gelu run, not r50's three
    assert out.is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("unknown regime", r"regime=r101 is not one of the paper's roadmaps: choose r50 .* r200"),
        ("unknown step", r"steps=kernel_3: not a step of regime=r50; its steps: resnet50, "),
        ("no step", r"steps=\[\] shows nothing"),
        ("missing runs path", r"runs=.*missing does not exist"),
        ("no run there", r"runs=.*empty holds no training run"),
        ("other models only", r"none of the 3 run\(s\) .* found model= convnext_atto \(1\), convnext_t \(2\)"),
        ("not a png", r"out=.*roadmap\.pdf: the figure is a \.png file"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(commands, name, message):
    result, out = commands[name]
    assert result.returncode == USER_ERROR_EXIT_CODE, result.stderr[-3000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and re.search(message, line), line
    assert result.stdout == ""
    assert not out.parent.exists()


@pytest.mark.slow  # all 16 steps composed and counted
def test_the_readmes_roadmap_table_is_what_the_code_counts():
    text = (REPO / "README.md").read_text()
    section = text.split("## The paper's roadmap", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| `")]
    readme = {line.split("`")[1]: [cell.strip() for cell in line.strip("|").split("|")] for line in lines}
    rows = table_rows(R50)
    assert list(readme) == [row.step.name for row in rows]
    for row in rows:
        cells = readme[row.step.name]
        assert cells[2:4] == [f"{row.params / 1e6:.2f}", f"{row.gmacs:.2f}"], row.step.name
        assert cells[4].startswith(f"{row.step.paper_gflops:.2f}") and cells[5] == f"{row.step.paper_top1:.2f}"
