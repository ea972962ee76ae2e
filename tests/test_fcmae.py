"""FCMAE (models/fcmae.py, tasks/masked_modeling.py): sparse semantics with dense tensors, proved two
ways; the loss; the masks; the official layout both ways; the recipe; the unlabeled folder source.
Training through train.py: tests/test_fcmae_training.py."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, randomize_
from PIL import Image
from test_metrics import offline_runs, wandb_history
from test_metrics import wandb_offline as wandb_offline  # a fixture, used by name
from test_weights import fcmae_checkpoint

from convnext_train.data.folder import UnlabeledImages
from convnext_train.data.loaders import SeededSamples
from convnext_train.data.sources import LoaderArgs, build_loaders
from convnext_train.errors import UserError
from convnext_train.metrics import WANDB_RUN_ID_FILE, RunLogger
from convnext_train.models import FCMAE, ConvNeXtV2
from convnext_train.models.fcmae import upsample_mask
from convnext_train.optim import parameter_groups
from convnext_train.readme.recipes import compose_config
from convnext_train.tasks.masked_modeling import FIGURE, MaskedImageModeling, sample_mask
from convnext_train.weights import load_pretrained, load_weights
from convnext_train.weights.errors import CheckpointError
from convnext_train.weights.layouts import fcmae_from_release, fcmae_to_release

DEPTHS, DIMS = (1, 1, 2, 1), (8, 16, 24, 32)


def tiny(img_size: int = 128, **kwargs) -> FCMAE:
    """128 px: a 4 x 4 patch grid, 16 patches, 6 kept and 10 removed at the official ratio 0.6."""
    model = FCMAE(img_size=img_size, depths=DEPTHS, dims=DIMS, decoder_embed_dim=16, **kwargs)
    return randomize_(model, std=0.1).eval()


def masks_for(count: int, num_patches: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.stack([sample_mask(seed + i, num_patches=num_patches, mask_ratio=0.6) for i in range(count)])


# --------------------------------------------------------------------------------------------------
# Sparse semantics, proof 1: nothing under the mask reaches the prediction
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_changing_the_pixels_under_the_mask_leaves_pred_unchanged():
    model = tiny()
    images = torch.randn(3, 3, 128, 128)
    mask = masks_for(3)
    _, pred, _ = model(images, mask=mask)

    removed = upsample_mask(mask, 128).bool().expand_as(images)
    scribbled = torch.where(removed, torch.randn_like(images) * 100, images)
    assert not torch.equal(scribbled, images)
    _, pred_scribbled, _ = model(scribbled, mask=mask)
    assert torch.equal(pred_scribbled, pred)

    # ... while a change to one visible patch does reach it (the test can fail)
    visible = ~upsample_mask(mask, 128).bool().expand_as(images)
    one_visible = visible & (torch.arange(3).view(3, 1, 1, 1) == 0)
    _, pred_changed, _ = model(torch.where(one_visible, images + 1, images), mask=mask)
    assert not torch.allclose(pred_changed[0], pred[0]) and torch.equal(pred_changed[1:], pred[1:])


# --------------------------------------------------------------------------------------------------
# Sparse semantics, proof 2: a coordinate-list encoder (MinkowskiEngine's formulation, no masking)
# --------------------------------------------------------------------------------------------------
def sparse_encoder(model: FCMAE, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder as a sparse network computes it, for one image: features exist at visible sites
    only, as a (sites, C) list with their coordinates; a convolution sums over the neighbours that
    exist; norms and linear layers act on the list's rows; GRN's norms run over the rows. The result
    is densified with zeros, as MinkowskiEngine's `.dense()`."""
    enc = model.encoder
    stem = enc.downsample_layers[0]
    dense = stem(image[None])[0]  # the stem reads 4 x 4 pixels inside one patch: dense in the official code too
    side = dense.shape[-1]
    grid = int(math.isqrt(mask.numel()))
    coords = [
        (i, j) for i in range(side) for j in range(side) if mask[(i * grid // side) * grid + j * grid // side] == 0
    ]
    rows = torch.stack([dense[:, i, j] for i, j in coords])

    def index_of(coords):
        return {c: n for n, c in enumerate(coords)}

    for s, stage in enumerate(enc.stages):
        if s > 0:  # LayerNorm on the rows, then the 2x2 stride-2 conv over the inputs that exist
            norm, conv = enc.downsample_layers[s]
            rows = F.layer_norm(rows, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            where = index_of(coords)
            out_coords = sorted({(i // 2, j // 2) for i, j in coords})
            out = []
            for oi, oj in out_coords:
                total = conv.bias.clone()
                for di in range(2):
                    for dj in range(2):
                        n = where.get((2 * oi + di, 2 * oj + dj))
                        if n is not None:
                            total = total + conv.weight[:, :, di, dj] @ rows[n]
                out.append(total)
            coords, rows = out_coords, torch.stack(out)
        where = index_of(coords)
        for block in stage:
            k = block.dwconv.kernel_size[0]
            mixed = block.dwconv.bias.expand(len(coords), -1).clone()
            for dy in range(k):
                for dx in range(k):
                    neighbours = [where.get((i + dy - k // 2, j + dx - k // 2), -1) for i, j in coords]
                    present = torch.tensor([n >= 0 for n in neighbours])
                    taken = rows[torch.tensor([max(n, 0) for n in neighbours])] * present[:, None]
                    mixed = mixed + taken * block.dwconv.weight[:, 0, dy, dx]
            h = block.act(block.pwconv1(block.norm(mixed)))
            g = h.pow(2).sum(dim=0).sqrt()  # GRN over the image's sites, which are its visible ones
            h = block.grn.gamma.flatten() * (h * (g / (g.mean() + block.grn.eps))) + block.grn.beta.flatten() + h
            rows = rows + block.pwconv2(h)
    out = torch.zeros(rows.shape[1], side >> 3, side >> 3)
    for (i, j), row in zip(coords, rows, strict=True):
        out[:, i, j] = row
    return out


@torch.no_grad()
def test_the_encoder_equals_a_sparse_coordinate_list_encoder():
    model = tiny()
    images = torch.randn(2, 3, 128, 128)
    mask = masks_for(2, seed=5)
    ours = model.encoder(images, mask)
    for n in range(2):
        reference = sparse_encoder(model, images[n], mask[n])
        scale = reference.abs().max()  # the official init (std 1) makes features of order 100
        assert (ours[n] - reference).abs().max() <= 1e-6 * scale, (ours[n] - reference).abs().max() / scale
        assert torch.equal(ours[n] == 0, reference == 0)  # removed sites are zero, visible ones are not
    # GRN's statistics are each image's own: the batch of two gives each image what it gives alone
    assert torch.allclose(model.encoder(images[1:], mask[1:])[0], ours[1], atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The loss and the masks
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_the_loss_is_the_pixel_mse_over_removed_patches_recomputed_from_pred(norm_pix_loss):
    model = tiny(norm_pix_loss=norm_pix_loss)
    images = torch.randn(2, 3, 128, 128)
    loss, pred, mask = model(images)  # a random mask: the official count removed from each image
    assert mask.shape == (2, 16) and mask.sum(dim=1).tolist() == [16 - int(16 * (1 - 0.6))] * 2
    assert pred.shape == (2, 32 * 32 * 3, 4, 4)

    # Patches by unfold (channel-major), the prediction's channels (row, column, colour) reordered to it
    target = F.unfold(images, kernel_size=32, stride=32).transpose(1, 2)  # (N, L, C*p*p)
    predicted = pred.reshape(2, 32, 32, 3, 16).permute(0, 4, 3, 1, 2).reshape(2, 16, -1)
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((predicted - target) ** 2).mean(-1)
    expected = per_patch[mask.bool()].mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_masks_are_a_pure_function_of_seed_epoch_and_index():
    class Blank(torch.utils.data.Dataset):
        def __len__(self):
            return 40

        def __getitem__(self, index):
            return torch.zeros(1), 7, False

    draw = lambda s: sample_mask(s, num_patches=49, mask_ratio=0.6)  # noqa: E731
    samples = SeededSamples(Blank(), transform=lambda x: x, seed=3).drawing(draw, 3)
    masks = {(e, i): samples[(e, i)][1] for e in range(2) for i in range(40)}
    assert all(m.sum() == 49 - int(49 * 0.4) for m in masks.values())  # 30 removed of 7 x 7, as the official
    again = SeededSamples(Blank(), transform=lambda x: x, seed=3).drawing(draw, 3)
    assert all(torch.equal(again[key][1], mask) for key, mask in masks.items())
    assert len({tuple(m.tolist()) for m in masks.values()}) == len(masks)  # another epoch or index, another mask
    other_seed = SeededSamples(Blank(), transform=lambda x: x, seed=4).drawing(draw, 4)
    assert not torch.equal(other_seed[(0, 0)][1], masks[(0, 0)])
    assert samples.images[0][1] == 7 and SeededSamples(Blank(), lambda x: x, 3)[(0, 0)][1] == 7  # labels otherwise


def test_a_source_that_cannot_draw_masks_is_refused_in_one_line():
    from omegaconf import OmegaConf

    args = LoaderArgs(seed=0, batch_size=2, device=torch.device("cpu"), sample_target=lambda s: torch.zeros(4))
    for kind in ("wds", "ffcv"):  # refused before the source is imported or any file is read
        with pytest.raises(UserError, match=f"data={kind} cannot give each sample a target.*data=imagefolder"):
            build_loaders(OmegaConf.create({"kind": kind}), None, args)


@pytest.mark.slow
def test_compiled_channels_last_training_matches_eager():
    # torch.compile's capture (aot_eager: the graph and its backward, without a cold inductor build)
    eager = tiny(img_size=64).train()
    compiled = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    forward = torch.compile(compiled, backend="aot_eager")
    images, mask = torch.randn(4, 3, 64, 64), masks_for(4, num_patches=4)
    loss, pred, _ = eager(images, mask=mask)
    loss_c, pred_c, _ = forward(images.to(memory_format=torch.channels_last), mask=mask)
    loss.backward()
    loss_c.backward()
    assert torch.allclose(loss_c, loss, rtol=1e-5) and torch.allclose(
        pred_c, pred, rtol=1e-4, atol=1e-4 * float(pred.abs().max())
    )
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        assert torch.allclose(b.grad, a.grad, rtol=1e-3, atol=1e-4 * float(a.grad.abs().max())), name


# --------------------------------------------------------------------------------------------------
# The official layout, both ways; fine-tuning from ours
# --------------------------------------------------------------------------------------------------
def test_our_checkpoint_goes_to_the_release_layout_and_back_bit_exact():
    model = tiny()
    ours = model.state_dict()
    release = fcmae_to_release(ours)
    back = fcmae_from_release(release)
    assert list(back) == list(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    # The encoder's sparse tensors are those of tests/test_weights.py's independent writer of the release
    encoder = ConvNeXtV2(depths=DEPTHS, dims=DIMS)
    encoder.load_state_dict(
        {k.removeprefix("encoder."): v for k, v in ours.items() if k.startswith("encoder.")}, strict=False
    )
    written = fcmae_checkpoint(encoder)["model"]
    encoder_names = [k for k in written if k.startswith("encoder.")]
    assert sorted(encoder_names) == sorted(k for k in release if k.startswith("encoder."))
    assert all(torch.equal(release[k], written[k]) for k in encoder_names)
    assert release["encoder.stages.0.0.dwconv.kernel"].shape == (49, DIMS[0])  # MinkowskiEngine's shapes
    assert release["encoder.downsample_layers.1.1.kernel"].shape == (4, DIMS[0], DIMS[1])


def test_a_release_checkpoint_continues_pre_training_and_ours_fine_tunes(tmp_path):
    source = tiny()
    torch.save({"model": fcmae_to_release(source.state_dict()), "epoch": 799}, tmp_path / "release.pt")
    model = FCMAE(img_size=128, depths=DEPTHS, dims=DIMS, decoder_embed_dim=16)
    assert load_pretrained(model, tmp_path / "release.pt") is False
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    with torch.no_grad():
        assert torch.equal(
            model.eval()(torch.ones(1, 3, 128, 128), mask=masks_for(1))[1],
            source(torch.ones(1, 3, 128, 128), mask=masks_for(1))[1],
        )

    other = FCMAE(img_size=128, depths=(1, 1, 3, 1), dims=DIMS, decoder_embed_dim=16)
    with pytest.raises(
        CheckpointError, match=r"encoder is a ConvNeXt V2 with depths \[1, 1, 2, 1\].*model.depths=\[1,1,2,1\]"
    ):
        load_pretrained(other, tmp_path / "release.pt")
    with pytest.raises(CheckpointError, match="not an FCMAE one"):
        load_weights(model, {"model": ConvNeXtV2(depths=DEPTHS, dims=DIMS).state_dict()})

    # Our own checkpoint fine-tunes a V2 classifier: the encoder exactly, norm and head fresh
    torch.save({"model": source.state_dict()}, tmp_path / "ours.pt")
    classifier = ConvNeXtV2(depths=DEPTHS, dims=DIMS, num_classes=5)
    fresh_head = classifier.head.weight.clone()
    load_pretrained(classifier, tmp_path / "ours.pt")
    for name, value in classifier.state_dict().items():
        if not name.startswith(("head.", "norm.")):
            assert torch.equal(value, source.state_dict()[f"encoder.{name}"]), name
    assert torch.equal(classifier.head.weight, fresh_head)


# --------------------------------------------------------------------------------------------------
# The recipe and the model's initialisation, against the official code
# --------------------------------------------------------------------------------------------------
def test_experiment_fcmae_is_the_official_pre_training_recipe():
    # Values: ConvNeXt-V2 main_pretrain.py's defaults and TRAINING.md (blr 1.5e-4, batch 4096, 800 epochs)
    cfg = compose_config("convnextv2_b", "fcmae")
    assert cfg.task == "fcmae" and cfg.model._target_ == "convnext_train.models.FCMAE"
    assert (list(cfg.model.depths), list(cfg.model.dims)) == ([3, 3, 27, 3], [128, 256, 512, 1024])
    m = cfg.model
    assert (m.decoder_depth, m.decoder_embed_dim, m.patch_size, m.mask_ratio, m.norm_pix_loss) == (
        1,
        512,
        32,
        0.6,
        True,
    )
    assert m.drop_path_rate == 0.0
    opt = cfg.optimizer
    assert opt.lr * cfg.trainer.global_batch_size / opt.lr_reference_batch == pytest.approx(1.5e-4 * 4096 / 256)
    assert opt.scale_lr_with_batch and list(opt.betas) == [0.9, 0.95] and opt.weight_decay == 0.05
    assert (cfg.trainer.epochs, cfg.trainer.global_batch_size, cfg.scheduler.warmup_epochs, cfg.scheduler.min_lr) == (
        800,
        4096,
        40,
        0.0,
    )
    a = cfg.aug
    assert list(a.scale) == [0.2, 1.0] and a.train_interpolation == "bicubic" and a.hflip == 0.5
    assert (a.auto_augment, a.color_jitter, a.reprob, a.mixup, a.cutmix, a.label_smoothing) == (
        None,
        None,
        0.0,
        0.0,
        0.0,
        0.0,
    )
    assert not cfg.ema.enabled


def test_weight_decay_spares_only_1d_parameters_and_biases_as_timm_0_3_2_add_weight_decay():
    model = tiny()
    groups = {g["name"]: g for g in parameter_groups(model, weight_decay=0.05, layer_decay=1.0, decay_grn=True)}
    decayed = {id(p) for p in groups["decay"]["params"]}
    for name, param in model.named_parameters():
        official = not (param.ndim == 1 or name.endswith(".bias"))  # add_weight_decay's rule
        assert (id(param) in decayed) == official, name
    assert id(model.mask_token) in decayed and id(model.encoder.stages[0][0].grn.gamma) in decayed


def test_the_initialisation_is_the_official_fcmae_one():
    # fcmae.py's _init_weights runs over the whole model after the sparse encoder's own: timm 0.3.2's
    # trunc_normal_ without std (1.0, cut at +-2) for nn.Conv2d and the encoder's depthwise convs and
    # linears; .02 for its MinkowskiConvolution (downsampling); the decoder's nn.Linear untouched.
    torch.manual_seed(0)
    model = FCMAE(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320))
    truncated_std = math.sqrt(1 - 2 * 2 * math.exp(-2) / math.sqrt(2 * math.pi) / math.erf(2 / math.sqrt(2)))  # 0.880
    for weight in (
        model.encoder.stages[2][0].pwconv1.weight,
        model.encoder.stages[2][0].dwconv.weight,
        model.encoder.downsample_layers[0][0].weight,
        model.pred.weight,
        model.decoder[0].dwconv.weight,
    ):
        assert weight.std().item() == pytest.approx(truncated_std, rel=0.05) and weight.abs().max() <= 2
    # the cut is at +-2 absolute (timm's and torch's a, b): 100 standard deviations at std .02, so none
    assert model.encoder.downsample_layers[2][1].weight.std().item() == pytest.approx(0.02, rel=0.05)
    bound = 1 / math.sqrt(512)  # nn.Linear's default (kaiming uniform, a=sqrt(5)): U(-1/sqrt(fan_in), ...)
    assert model.decoder[0].pwconv1.weight.abs().max() <= bound and model.decoder[0].pwconv1.bias.abs().max() > 0
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(
        b.abs().max() == 0 for n, b in model.named_parameters() if n.endswith(".bias") and "decoder.0.pw" not in n
    )


# --------------------------------------------------------------------------------------------------
# A folder of unlabeled images
# --------------------------------------------------------------------------------------------------
def test_an_unlabeled_folder_is_read_recursively_with_unreadable_files_handled(tmp_path):
    root = tmp_path / "photos"
    for path in (root / "b.png", root / "day1" / "a.jpg", root / "day1" / "deeper" / "c.JPEG"):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (len(path.name) * 40, 0, 0)).save(path)
    (root / "notes.txt").write_text("not an image")
    (root / "day1" / "broken.jpg").write_bytes(b"not a jpeg")

    images = UnlabeledImages(root, skip_corrupt=True)
    names = [p.split("photos/")[1] for p, _ in images.samples]
    assert names == ["b.png", "day1/a.jpg", "day1/broken.jpg", "day1/deeper/c.JPEG"]
    with pytest.warns(UserWarning, match="broken.jpg"):
        image, label, replaced = images[2]
    assert replaced and label == 0 and image.size == (40, 30)
    with pytest.raises(UserError, match="cannot read image .*broken.jpg.*data.skip_corrupt=true"):
        UnlabeledImages(root, skip_corrupt=False)[2]
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        UnlabeledImages(tmp_path / "empty", skip_corrupt=False)


# --------------------------------------------------------------------------------------------------
# What an evaluation shows: the validation loss and reconstructions.png, also in W&B
# --------------------------------------------------------------------------------------------------
def test_the_evaluation_scores_fixed_masks_and_the_figure_goes_to_wandb(tmp_path, wandb_offline):
    from omegaconf import OmegaConf

    model = tiny()
    images = torch.randn(5, 3, 128, 128)
    masks = masks_for(5, seed=9)
    loader = [
        (images[:3], masks[:3], torch.zeros(3, dtype=torch.bool)),
        (images[3:], masks[3:], torch.ones(2, dtype=torch.bool)),
    ]
    task = MaskedImageModeling(num_patches=16, mask_ratio=0.6, figure_images=2)
    scores = task.evaluate(
        model,
        loader,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        memory_format=torch.contiguous_format,
    )
    per_image = [
        model.forward_loss(images[i : i + 1], model(images[i : i + 1], mask=masks[i : i + 1])[1], masks[i : i + 1])
        for i in range(5)
    ]
    assert scores["loss"] == pytest.approx(float(torch.stack(per_image).mean().detach()), rel=1e-5)
    assert scores["images"] == 5 and scores["skipped_images"] == 2

    logger_cfg = OmegaConf.merge(
        OmegaConf.load(REPO / "convnext_train" / "conf" / "logger" / "wandb.yaml"), {"run_name": "fcmae"}
    )
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, logger_cfg, config={}) as logger:
        (figure,) = task.write_figures(run_dir)
        logger.log_image(figure, step=4)
    assert figure == run_dir / FIGURE and Image.open(figure).size == (4 * 128 + 5 * 2, 2 * 128 + 3 * 2)
    (records,) = offline_runs(run_dir, (run_dir / WANDB_RUN_ID_FILE).read_text().strip())
    (row,) = wandb_history(records)
    assert row["_step"] == 4 and row["reconstructions/_type"] == "image-file"
    assert (row["reconstructions/width"], row["reconstructions/height"]) == Image.open(figure).size
    (copy,) = run_dir.glob(f"wandb/offline-run-*/files/{row['reconstructions/path']}")
    assert copy.read_bytes() == figure.read_bytes()
