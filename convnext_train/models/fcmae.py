"""ConvNeXt V2's fully convolutional masked autoencoder (FCMAE; Woo et al., CVPR 2023, section 3) with
dense masked convolutions in place of MinkowskiEngine's sparse ones.

Written by hand because nothing maintained has it: the official fcmae.py needs MinkowskiEngine (custom
CUDA kernels, timm 0.3.2), and timm and Hugging Face ship the V2 networks without their pre-training.
The authors' own JAX runs used the dense formulation (their TRAINING.md: "numerically identical to
sparse conv"); this is that formulation in PyTorch.

    model = FCMAE(depths=[2, 2, 6, 2], dims=[40, 80, 160, 320])    # official keywords
    loss, pred, mask = model(images)                               # mask: (N, L), 1 = removed

Names: the encoder is this project's ConvNeXtV2 (`encoder.downsample_layers.*`, `encoder.stages.*`,
dense shapes) without its final norm and head, so `finetune.checkpoint=` reads a pre-training
checkpoint directly; the decoder keeps the official names (`proj`, `mask_token`, `decoder.<i>` as
V2 blocks, `pred`). layouts.py converts to and from the released sparse layout.

Sparse semantics with dense tensors: a removed patch is a hole the encoder never sees. Masked sites
are held at zero between blocks (the sparse tensor has no such sites; densified, they read zero), the
depthwise conv reads only those zeros there and its output is zeroed again before GRN, whose norms
therefore run over visible sites only; LayerNorm and the linear layers act per site; a 2x2/stride-2
downsampling window lies inside one patch at every stage (each stage's grid is a multiple of the
patch grid), so it is all visible or all removed. No masked pixel can reach a visible site.

One deliberate difference: GRN's norms are per image. The official MinkowskiGRN takes them over
`x.F`, the visible sites of every image in the batch together, which makes an image's features
depend on its batch neighbours and on the number of GPUs; per image is what the dense GRN computes
when the encoder is fine-tuned, and what makes 2 processes train like 1 here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from convnext_train.models.convnextv2 import BlockV2, ConvNeXtV2


def random_masks(
    count: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(count, num_patches) float masks, 1 = removed: each row removes exactly
    `num_patches - int(num_patches * (1 - mask_ratio))` patches chosen uniformly, as the official
    `gen_random_mask` (which ranks Gaussian noise; any continuous noise gives the same law)."""
    keep = int(num_patches * (1 - mask_ratio))
    ranks = torch.rand(count, num_patches, generator=generator).argsort(dim=1).argsort(dim=1)
    return (ranks >= keep).float()


def upsample_mask(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(N, L) patch mask -> (N, 1, size, size) at a feature map's resolution (nearest: each patch
    covers size / sqrt(L) sites a side)."""
    side = int(mask.shape[1] ** 0.5)
    grid = mask.reshape(-1, 1, side, side)
    scale = size // side
    return grid.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


class FCMAEEncoder(nn.Module):
    """ConvNeXt V2's stem, downsampling layers and stages (this project's modules and names), run
    over visible sites only."""

    def __init__(self, depths: Sequence[int], dims: Sequence[int], in_chans: int, drop_path_rate: float):
        super().__init__()
        network = ConvNeXtV2(depths=depths, dims=dims, in_chans=in_chans, drop_path_rate=drop_path_rate)
        self.downsample_layers = network.downsample_layers
        self.stages = nn.ModuleList(MaskedStage(*stage) for stage in network.stages)  # the same names

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = images
        for downsample, stage in zip(self.downsample_layers, self.stages, strict=True):
            x = downsample(x)
            visible = 1.0 - upsample_mask(mask, x.shape[-1]).to(x.dtype)
            x = x * visible
            x = stage(x, visible.permute(0, 2, 3, 1))  # (N, H, W, 1): the blocks work channels-last
        return x


class MaskedStage(nn.Sequential):
    """A stage's V2 blocks run over visible sites. Called as a module, so that FSDP, which shards each
    stage as a unit (parallelize.py), gathers its weights around this call."""

    def forward(self, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        for block in self:
            x = masked_block(block, x, visible)
        return x


def masked_block(block: BlockV2, x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """`block` over the visible sites of `x` (zero at removed sites, and left so)."""
    branch = block.act(block.pwconv1(block.norm(block.dwconv(x).permute(0, 2, 3, 1))))
    branch = block.pwconv2(block.grn(branch * visible))  # GRN's norms over visible sites
    return x + block.drop_path((branch * visible).permute(0, 3, 1, 2))


class FCMAE(nn.Module):
    """Fully convolutional masked autoencoder with a ConvNeXt V2 encoder (official constructor
    keywords; `drop_path_rate` is the sparse encoder's, 0 in the official pre-training)."""

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        decoder_depth: int = 1,
        decoder_embed_dim: int = 512,
        patch_size: int = 32,
        mask_ratio: float = 0.6,
        norm_pix_loss: bool = True,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
        num_classes: int | None = None,
        head_init_scale: float | None = None,
    ):
        # num_classes and head_init_scale: the classification keys of conf/model/convnextv2_*.yaml,
        # which experiment=fcmae builds this from; the encoder has no head, so they are not used.
        super().__init__()
        if grad_checkpointing:
            raise ValueError("grad_checkpointing is not implemented for FCMAE; set model.grad_checkpointing=false")
        if patch_size != 2 ** (len(depths) + 1):
            raise ValueError(f"patch_size={patch_size}: the encoder's output stride is {2 ** (len(depths) + 1)}")
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size, self.in_chans, self.patch_size = img_size, in_chans, patch_size
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.num_patches = (img_size // patch_size) ** 2

        self.encoder = FCMAEEncoder(depths, dims, in_chans, drop_path_rate)
        self.proj = nn.Conv2d(dims[-1], decoder_embed_dim, kernel_size=1)
        self.mask_token = nn.Parameter(torch.zeros(1, decoder_embed_dim, 1, 1))
        self.decoder = nn.Sequential(*(BlockV2(decoder_embed_dim) for _ in range(decoder_depth)))
        self.pred = nn.Conv2d(decoder_embed_dim, patch_size**2 * in_chans, kernel_size=1)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official FCMAE's initialisation, which its `_init_weights` applies over the whole model
        after the sparse encoder's own (timm 0.3.2's `trunc_normal_` defaults to std 1, cut at +-2):
        every dense Conv2d (stem, proj, pred, decoder dwconv) and the encoder's depthwise convs and
        linears at std 1, its downsampling convs at std .02, biases 0; LayerNorms 1/0; GRN 0; the
        decoder's linears keep PyTorch's default; the mask token N(0, .02)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                if name.startswith("decoder.") and isinstance(module, nn.Linear):
                    continue
                downsampling = name.startswith("encoder.downsample_layers.") and not name.startswith(
                    "encoder.downsample_layers.0."
                )
                nn.init.trunc_normal_(module.weight, std=0.02 if downsampling else 1.0, a=-2.0, b=2.0)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)

    def shard_units(self) -> list[nn.Module]:
        """What FSDP shards one by one (parallelize.py): each encoder stage, and the decoder."""
        return [*self.encoder.stages, self.decoder]

    # ----------------------------------------------------------------------------------------------
    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), each patch's pixels in (row, column, channel) order."""
        n, c, h, w = images.shape
        p = self.patch_size
        x = images.reshape(n, c, h // p, p, w // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) -> (N, C, H, W); square images."""
        n, length, _ = patches.shape
        p, c, side = self.patch_size, self.in_chans, int(length**0.5)
        x = patches.reshape(n, side, side, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, side * p, side * p)

    def forward_decoder(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.proj(features)
        removed = mask.reshape(-1, 1, *x.shape[-2:]).to(x.dtype)
        x = x * (1.0 - removed) + self.mask_token.to(x.dtype) * removed
        return self.pred(self.decoder(x))

    def pixel_targets(self, images: torch.Tensor) -> torch.Tensor:
        """(N, L, p*p*C) targets: each patch normalised by its own mean and variance when
        `norm_pix_loss` (the official per-patch targets, unbiased variance, eps 1e-6)."""
        target = self.patchify(images.float())
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def patch_losses(self, images: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """(N, L) mean squared error of each patch's prediction, in float32."""
        n, c = pred.shape[:2]
        pred = pred.float().reshape(n, c, -1).transpose(1, 2)
        return (pred - self.pixel_targets(images)).pow(2).mean(dim=-1)

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The mean of the removed patches' losses (visible patches do not count)."""
        return (self.patch_losses(images, pred) * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, pred (N, p*p*C, H/p, W/p), mask (N, L) with 1 = removed). A given mask is used as is;
        without one, a random mask (global RNG) removes the official share of each image's patches."""
        side = imgs.shape[-1] // self.patch_size
        if imgs.shape[-2] != imgs.shape[-1] or imgs.shape[-1] % self.patch_size:
            raise ValueError(f"FCMAE needs square images whose side is a multiple of {self.patch_size}")
        if mask is None:
            mask = random_masks(imgs.shape[0], side * side, self.mask_ratio).to(imgs.device)
        mask = mask.to(device=imgs.device, dtype=torch.float32)
        pred = self.forward_decoder(self.encoder(imgs, mask), mask)
        return self.forward_loss(imgs, pred, mask), pred, mask


def reconstructions(
    model: FCMAE, images: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, prediction with the visible patches pasted back), both (N, C, H, W) images: each
    predicted patch brought back to the patch's own pixel statistics when targets were normalised."""
    patches = model.patchify(images.float())
    predicted = pred.float().flatten(2).transpose(1, 2)
    if model.norm_pix_loss:
        mean, var = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
        predicted = predicted * (var + 1.0e-6) ** 0.5 + mean
    removed = mask.float().unsqueeze(-1)
    return model.unpatchify(predicted), model.unpatchify(patches * (1 - removed) + predicted * removed)
