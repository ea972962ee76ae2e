"""DDP and FSDP2 as `parallelize` applies them, and the EMA that works under both, in real
process groups (torchrun, gloo on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO, build_model, randomize_
from timm.utils import ModelEmaV3

from convnext_train.ema import WeightEma


def test_weight_ema_updates_like_timms_model_ema_bitwise():
    """The official code's EMA: timm's, at a constant decay from the first step (no warmup; timm's
    `update(model, step)` would copy the weights outright at steps 0 and 1)."""
    model = build_model("convnext_atto", num_classes=5)
    ours, timms = WeightEma(model, decay=0.9), ModelEmaV3(model, decay=0.9)
    for seed in range(3):  # the model moves, both averages follow
        randomize_(model, seed=seed)
        ours.update(model)
        timms.update(model)
    with ours.swapped_into(model) as swapped:
        for (name, a), b in zip(swapped.state_dict().items(), timms.module.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_the_ema_swap_restores_the_trained_weights_and_keeps_what_was_loaded():
    model = build_model("convnext_atto", num_classes=5)
    ema = WeightEma(model, decay=0.5)
    randomize_(model, seed=1)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = build_model("convnext_atto", num_classes=5)
    randomize_(loaded, seed=2)
    with ema.swapped_into(model):
        model.load_state_dict(loaded.state_dict())  # as resuming loads the checkpoint's EMA
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    with ema.swapped_into(model):
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())


# Run by torchrun in two processes: one accumulation window of two micro-batches under each
# strategy, checked against the whole global batch in one process.
WORKER = textwrap.dedent(
    """
    import json, sys
    import torch, torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from convnext_train.distributed import init_processes
    from convnext_train.models import build_model
    from convnext_train.parallelize import parallelize
    from convnext_train.checkpointing.state import ModelState, OptimizerState
    from omegaconf import OmegaConf

    strategy, compiled, out = sys.argv[1], sys.argv[2] == "compiled", sys.argv[3]
    processes = init_processes("cpu", 5)
    cfg = OmegaConf.load("convnext_train/conf/model/convnext_atto.yaml")
    cfg.num_classes, cfg.drop_path_rate = 5, 0.0
    torch.manual_seed(0)
    reference = build_model(cfg)
    model = build_model(cfg)
    model.load_state_dict(reference.state_dict())
    parallel = parallelize(model, processes, torch.device("cpu"), strategy=strategy, precision="fp32", compile_model=compiled)

    images = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    rank, world = processes.rank, processes.world_size
    micro = [images[rank::world][:2], images[rank::world][2:]]  # this rank's two micro-batches

    def grads():
        return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}

    with parallel.no_sync():
        (parallel.forward(micro[0]).square().mean() / 2).backward()
    after_first = grads()
    (parallel.forward(micro[1]).square().mean() / 2).backward()
    after_last = grads()

    # The same global batch in one process: mean over the 4 micro-batches of 2.
    for chunk in images.split(2):
        (reference(chunk).square().mean() / 4).backward()
    expected = {n: p.grad for n, p in reference.named_parameters()}
    error = max(float((after_last[n] - expected[n]).norm() / expected[n].norm().clamp_min(1e-12)) for n in expected)

    local = [after_first[n] for n in sorted(after_first)]
    gathered = [None] * world
    dist.all_gather_object(gathered, [t.tolist() for t in local])
    first_equal_across_ranks = all(torch.equal(torch.tensor(a), torch.tensor(b)) for a, b in zip(*gathered)) if local else None

    # Checkpoints hold whole tensors keyed by name, whatever the strategy.
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.step()
    weights, optimizer_state = ModelState(model).full_state_dict(), OptimizerState(model, optimizer).full_state_dict()
    if rank == 0:
        assert weights.keys() == reference.state_dict().keys()
        assert set(optimizer_state["state"]) == {n for n, _ in reference.named_parameters()}
    states = [weights, optimizer_state]
    dist.broadcast_object_list(states)
    fresh = torch.optim.AdamW(model.parameters())
    ModelState(model).load_full_state_dict(states[0])
    OptimizerState(model, fresh).load_full_state_dict(states[1])
    restored = ModelState(model).full_state_dict()
    reloaded_equal = all(torch.equal(restored[k], states[0][k]) for k in restored) if rank == 0 else True

    if rank == 0:
        json.dump({
            "grads_after_first": len(after_first),
            "first_equal_across_ranks": first_equal_across_ranks,
            "relative_error": error,
            "reloaded_equal": reloaded_equal,
        }, open(out, "w"))
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize(
    "strategy, compiled",
    [
        # Each is a torchrun start (~35 s on two loaded cores): the fast set leaves them to the suite.
        pytest.param("ddp", "eager", marks=pytest.mark.slow),
        pytest.param("fsdp", "eager", marks=pytest.mark.slow),
        pytest.param("fsdp", "compiled", marks=pytest.mark.slow),
    ],
)
def test_gradients_sync_on_the_last_micro_batch_only_and_match_one_process(strategy, compiled, tmp_path):
    """Compiled: each stage compiled in place before sharding (about a minute of Inductor on 2 CPU cores)."""
    script, out = tmp_path / "worker.py", tmp_path / "out.json"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            strategy,
            compiled,
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    found = json.loads(out.read_text())
    if strategy == "ddp":
        # No all-reduce on the first micro-batch: each rank holds the gradient of its own images.
        assert found["grads_after_first"] > 0 and found["first_equal_across_ranks"] is False
    else:
        # No reduce-scatter on the first micro-batch: FSDP keeps the unsharded sum to itself.
        assert found["grads_after_first"] == 0
    assert found["relative_error"] < 1e-5
    assert found["reloaded_equal"]
