"""The recipe's per-image augmentation, applied to a batch of uint8 images on the training device.

The FFCV fast path decodes, RandomResizedCrops and flips in FFCV's loader and hands over uint8 NCHW
batches. What the PIL path does after that (`transforms.train_transform`: timm's RandAugment,
ToTensor + Normalize, RandomErasing) is done here on the batch, each image with its own ops and
magnitudes, as timm's PIL path gives each image.

Why by hand: timm's RandAugment works on one PIL image at a time, and torchvision's
`v2.RandAugment` applies one op with one magnitude to a whole batch and has neither timm's
magnitude noise (`mstd`) nor timm's "increasing" op set. So the policy is read from timm's own
`rand_augment_transform` object (ops, probabilities, magnitudes, noise, number of layers), and
each op is re-implemented on tensors to give what timm's PIL op gives: the colour and point ops
bit for bit (PIL's integer and float32 arithmetic, truncations and LUT clipping are reproduced),
the geometric ops with PIL's own bicubic filter (its a = -1 cubic, edge-clamped taps, fill
outside the image), which differs from PIL only by float32-vs-double rounding: at most one level,
on 0.001-0.2% of the values.

Randomness: a batch's augmentation is a function of (seed, batch): every draw comes from
generators seeded by the caller's `seed`, never from the process-wide RNGs. The per-image choices
come from a CPU generator, so a CPU and a GPU run apply the same ops and magnitudes (only the
erasing noise comes from the device's generator). Keeping off the global RNGs also keeps this
safe to call from FFCV's pipeline thread: forking or reseeding them around each batch would race
with the training loop's draws (drop path, Mixup). That is why two timm pieces are mirrored
rather than called: `LEVEL_TO_ARG` draws its sign flips from the global `random`, and
`RandomErasing` draws from `random` and torch's global generator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp

from convnext_train.errors import UserError

__all__ = ["BatchAugment", "normalize"]

SUPPORTED = (
    "the batched (FFCV) augmentation supports timm RandAugment strings 'rand-m<M>[-n<N>][-p<P>][-mstd<S>][-inc<0|1>]' "
    "with train_interpolation bicubic (no AutoAugment/AugMix policies, no 'mmax', no 't' op sets), and no colour "
    "jitter without RandAugment"
)

# timm's `_LEVEL_DENOM`: magnitude M means level M / 10, and magnitudes are clipped to [0, 10].
LEVEL_DENOM = 10.0

# On the CPU, ops run on a few images at a time: their float temporaries then stay in cache, which
# measured 1.5x faster for a whole batch than one pass over each group. On a GPU, a group is one
# launch per step.
CPU_CHUNK = 2


# --------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float32 NCHW with ImageNet mean/std, with the same float32 operations as
    torchvision's ToTensor + Normalize (x / 255, - mean, / std), so the values equal the PIL path's."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device).view(1, -1, 1, 1)
    out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
    for part in _chunks(images.shape[0], images.device):
        out[part].copy_(images[part]).div_(255).sub_(mean).div_(std)
    return out


def _chunks(n: int, device: torch.device) -> list[slice]:
    size = CPU_CHUNK if device.type == "cpu" else max(n, 1)
    return [slice(i, i + size) for i in range(0, n, size)]


# --------------------------------------------------------------------------------------------------
# Point ops: uint8 in, uint8 out; `arg` has one value per image, shaped (G, 1, 1, 1)
# --------------------------------------------------------------------------------------------------


def _invert(images, _arg, _fill):
    return 255 - images


def _posterize(images, bits, _fill):
    """PIL keeps the top `bits` bits; >= 8 keeps the image. 0 bits gives black, as this repo's
    patched timm op does (`transforms.posterize_zero_bits_black`)."""
    mask = (255 << (8 - bits.long().clamp(0, 8))) & 255
    return images & mask.to(images.device, torch.uint8)


def _solarize(images, threshold, _fill):
    return torch.where(images < threshold.to(images.device), images, 255 - images)


def _solarize_add(images, add, _fill):
    # timm adds to values below 128 and caps at 255; add <= 128 keeps 127 + add within uint8.
    return torch.where(images < 128, images + add.to(images.device, torch.uint8), images)


def _apply_lut(images, lut):
    """`lut` (G, C, 256) uint8: PIL's `Image.point` with one table per image and channel."""
    g, c, h, w = images.shape
    return lut.reshape(g * c, 256).gather(1, images.reshape(g * c, h * w).long()).view(g, c, h, w)


def _autocontrast(images, _arg, _fill):
    """PIL `ImageOps.autocontrast` (cutoff 0): per channel, lut[i] = int(i * scale + offset) clipped
    to [0, 255] with scale = 255 / (hi - lo), offset = -lo * scale, in double precision as PIL's
    Python code computes it; identity when the channel is flat."""
    lo = images.amin(dim=(2, 3)).double()[..., None]
    hi = images.amax(dim=(2, 3)).double()[..., None]
    scale = 255.0 / (hi - lo).clamp(min=1)
    offset = -lo * scale
    levels = torch.arange(256, dtype=torch.float64, device=images.device)
    lut = (levels * scale + offset).trunc().clamp(0, 255)
    lut = torch.where(hi > lo, lut, levels)
    return _apply_lut(images, lut.to(torch.uint8))


def _equalize(images, _arg, _fill):
    """PIL `ImageOps.equalize`: per channel, step = (pixels - count of the last used value) // 255,
    lut[i] = (step // 2 + pixels below i) // step (clipped to 255 by `point`); identity if step is 0
    (which covers a single used value)."""
    g, c, h, w = images.shape
    flat = images.reshape(g * c, h * w).long()
    hist = torch.zeros(g * c, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, flat, torch.ones((), dtype=torch.int64, device=images.device).expand_as(flat))
    last_used = 255 - (hist > 0).flip(1).to(torch.uint8).argmax(1, keepdim=True)
    step = (h * w - hist.gather(1, last_used)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp(min=1)).clamp(max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=images.device))
    return lut.to(torch.uint8).gather(1, flat).view(g, c, h, w)


# --------------------------------------------------------------------------------------------------
# Blend ops: PIL's ImageEnhance, i.e. Image.blend(degenerate, image, factor)
# --------------------------------------------------------------------------------------------------


def _blend(degenerate, images, factor):
    """PIL `ImagingBlend`: float32 `in1 + alpha * (in2 - in1)`, clipped to [0, 255], truncated."""
    in1 = degenerate.float()
    out = images.float().sub_(in1).mul_(factor.to(images.device, torch.float32)).add_(in1)
    return out.clamp_(0, 255).to(torch.uint8)


def _luma(images):
    """PIL's RGB -> L conversion: (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16, as int32 (G, 1, H, W)."""
    r, g, b = images.to(torch.int32).unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1)


def _color(images, factor, _fill):
    return _blend(_luma(images), images, factor)


def _contrast(images, factor, _fill):
    """The degenerate image is the grey level int(mean(L) + 0.5)."""
    luma = _luma(images)
    mean = luma.sum(dim=(1, 2, 3), keepdim=True).double() / luma[0].numel()
    return _blend((mean + 0.5).floor(), images, factor)


def _brightness(images, factor, _fill):
    # The blend with a black degenerate, 0 + f * (x - 0), is f * x.
    return images.float().mul_(factor.to(images.device, torch.float32)).clamp_(0, 255).to(torch.uint8)


def _sharpness(images, factor, _fill):
    """The degenerate image is PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded,
    border pixels copied). PIL sums in float32 with 1/13 weights; floor((S + 6.5) / 13) on the
    integer sum S is the same number (the true value is never within 1/26 of a rounding edge)."""
    x = images.float()
    rows = x[..., :-2] + x[..., 1:-1] + x[..., 2:]
    total = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    total.add_(x[..., 1:-1, 1:-1], alpha=4)
    smooth = images.clone()
    smooth[..., 1:-1, 1:-1] = total.add_(6.5).div_(13).floor_()
    return _blend(smooth, images, factor)


# --------------------------------------------------------------------------------------------------
# Geometric ops: PIL's Image.transform(AFFINE, BICUBIC, fillcolor=...)
# --------------------------------------------------------------------------------------------------


def _source_points(matrices, h, w):
    """Where PIL samples the input for each output pixel: (a x' + b y' + c, d x' + e y' + f) at the
    pixel centre (x', y') = (x + 0.5, y + 0.5), in double precision as PIL does. (G, 1, H, W) each."""
    xs = torch.arange(w, dtype=torch.float64, device=matrices.device) + 0.5
    ys = torch.arange(h, dtype=torch.float64, device=matrices.device)[:, None] + 0.5
    a, b, c, d, e, f = (m[:, None, None, None] for m in matrices.unbind(1))
    return a * xs + b * ys + c, d * xs + e * ys + f


def _taps(position, size):
    """PIL's bicubic taps along one axis (Geometry.c): the index of the first of the four pixels
    around `position`, in an image padded by 2 (kept in range for points that get the fill), and
    the weights of taps 0, 2, 3 in PIL's cubic (a = -1), with t the fraction past tap 1:
    v1 + t (v2 - v0) + t^2 (2 v0 - 2 v1 + v2 - v3) + t^3 (v1 - v0 + v3 - v2)."""
    position = position - 0.5
    base = position.floor()
    t = (position - base).float()
    t2 = t * t
    first = base.long().add_(1).clamp_(0, size)
    return first, (t * (2 * t - t2 - 1), t * (1 + t - t2), t2 * (t - 1))


def _cubic(taps, weights):
    """v1 + sum w (v - v1) over taps 0, 2, 3: PIL's cubic (its weights sum to 1), written around tap 1
    so equal taps give exactly that value, as PIL's form does (truncation would otherwise turn a
    flat 100 computed as 99.99999 into 99). Consumes `taps` (float32)."""
    centre, others = taps[1], (taps[0], taps[2], taps[3])
    differences = [tap.sub_(centre) for tap in others]
    for weight, difference in zip(weights, differences):
        centre.addcmul_(weight, difference)
    return centre


def _pad(images, dim):
    """Repeat the edge pixels twice along `dim`: PIL clamps tap indices to the image."""
    first, last = images.narrow(dim, 0, 1), images.narrow(dim, images.shape[dim] - 1, 1)
    return torch.cat([first, first, images, last, last], dim)


def _affine(images, matrices, fill, axis=None):
    """Each image resampled by its PIL affine matrix (output -> input, 6 values per image), as PIL's
    `Image.transform(AFFINE, BICUBIC, fillcolor=fill)`: `fill` where the point is outside the image.

    `axis` "x" or "y" says the matrix moves pixels along that axis only (shear, translate): the
    other coordinate is then exactly the pixel's own, where PIL's cubic weights are (0, 1, 0, 0), so
    a 1-D filter gives PIL's result with 4 taps instead of 16.
    """
    g, c, h, w = images.shape
    sx, sy = _source_points(matrices.to(images.device), h, w)
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    # Taps are gathered from uint8 (a quarter of float32's memory traffic), from shifted views of the
    # padded image so that one index tensor serves all taps.
    if axis == "x":
        first, weights = _taps(sx, w)
        padded, index = _pad(images, 3), first.expand(g, c, h, w)
        out = _cubic([padded[..., k:].gather(3, index).float() for k in range(4)], weights)
    elif axis == "y":
        first, weights = _taps(sy, h)
        padded, index = _pad(images, 2), first.expand(g, c, h, w)
        out = _cubic([padded[:, :, k:].gather(2, index).float() for k in range(4)], weights)
    else:
        first_x, weights_x = _taps(sx, w)
        first_y, weights_y = _taps(sy, h)
        flat = _pad(_pad(images, 2), 3).reshape(g, c, -1)
        index = (first_y * (w + 4) + first_x).view(g, 1, h * w).expand(g, c, h * w)

        def tap(row, col):
            return flat[..., row * (w + 4) + col :].gather(2, index).view(g, c, h, w).float()

        out = _cubic([_cubic([tap(row, col) for col in range(4)], weights_x) for row in range(4)], weights_y)
    out = out.clamp_(0, 255).to(torch.uint8)
    for channel, value in enumerate(fill):
        out[:, channel].masked_fill_(~inside[:, 0], value)
    return out


def _rotation_matrix(degrees: float, w: int, h: int) -> list[float]:
    """PIL `Image.rotate(degrees)` (about the centre, same size) as the matrix it passes to transform."""
    angle = -math.radians(degrees % 360.0)
    m = [
        round(math.cos(angle), 15),
        round(math.sin(angle), 15),
        0.0,
        round(-math.sin(angle), 15),
        round(math.cos(angle), 15),
        0.0,
    ]
    cx, cy = w / 2, h / 2
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return m


def _rotate(images, degrees, fill):
    h, w = images.shape[2:]
    matrices = torch.tensor([_rotation_matrix(d, w, h) for d in degrees.flatten().tolist()], dtype=torch.float64)
    return _affine(images, matrices, fill)


def _shear_x(images, factor, fill):
    return _affine(images, _matrices(factor, lambda s: (1, s, 0, 0, 1, 0)), fill, axis="x")


def _shear_y(images, factor, fill):
    return _affine(images, _matrices(factor, lambda s: (1, 0, 0, s, 1, 0)), fill, axis="y")


def _translate_x(images, pixels, fill):
    return _affine(images, _matrices(pixels, lambda p: (1, 0, p, 0, 1, 0)), fill, axis="x")


def _translate_y(images, pixels, fill):
    return _affine(images, _matrices(pixels, lambda p: (1, 0, 0, 0, 1, p)), fill, axis="y")


def _translate_x_rel(images, fraction, fill):
    return _translate_x(images, fraction * images.shape[3], fill)  # timm: pct * width pixels


def _translate_y_rel(images, fraction, fill):
    return _translate_y(images, fraction * images.shape[2], fill)


def _matrices(values, row):
    return torch.tensor([row(v) for v in values.flatten().tolist()], dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# The op table: timm op name -> (magnitude -> argument, as timm's LEVEL_TO_ARG; tensor op)
# --------------------------------------------------------------------------------------------------


def _enhance(level, _sign, _hp):  # timm _enhance_level_to_arg
    return level * 1.8 + 0.1


def _enhance_increasing(level, sign, _hp):  # timm _enhance_increasing_level_to_arg
    return (1.0 + sign * (level * 0.9)).clamp(min=0.1)


def _posterize_bits(level, _sign, _hp):  # timm _posterize_level_to_arg: int() of a value >= 0
    return (level * 4).floor()


def _solarize_threshold(level, _sign, _hp):  # timm _solarize_level_to_arg
    return (level * 256).floor().clamp(max=256)


def _signed(scale):  # timm's rotate, shear and translate args: level * scale, negated half the time
    return lambda level, sign, hp: level * scale(hp) * sign


# Each argument function gets the level (magnitude / 10, float64), a random sign (+-1, the draw
# timm's `_randomly_negate` makes) and timm's hparams; each op gets uint8 images, the argument
# shaped (G, 1, 1, 1) and the fill colour.
OPS: dict[str, tuple[Callable | None, Callable]] = {
    "AutoContrast": (None, _autocontrast),
    "Equalize": (None, _equalize),
    "Invert": (None, _invert),
    "Rotate": (_signed(lambda hp: 30.0), _rotate),
    "Posterize": (_posterize_bits, _posterize),
    "PosterizeIncreasing": (lambda level, s, hp: 4 - _posterize_bits(level, s, hp), _posterize),
    "PosterizeOriginal": (lambda level, s, hp: _posterize_bits(level, s, hp) + 4, _posterize),
    "Solarize": (_solarize_threshold, _solarize),
    "SolarizeIncreasing": (lambda level, s, hp: 256 - _solarize_threshold(level, s, hp), _solarize),
    "SolarizeAdd": (lambda level, s, hp: (level * 110).floor().clamp(max=128), _solarize_add),
    "Color": (_enhance, _color),
    "ColorIncreasing": (_enhance_increasing, _color),
    "Contrast": (_enhance, _contrast),
    "ContrastIncreasing": (_enhance_increasing, _contrast),
    "Brightness": (_enhance, _brightness),
    "BrightnessIncreasing": (_enhance_increasing, _brightness),
    "Sharpness": (_enhance, _sharpness),
    "SharpnessIncreasing": (_enhance_increasing, _sharpness),
    "ShearX": (_signed(lambda hp: 0.3), _shear_x),
    "ShearY": (_signed(lambda hp: 0.3), _shear_y),
    "TranslateX": (_signed(lambda hp: float(hp["translate_const"])), _translate_x),
    "TranslateY": (_signed(lambda hp: float(hp["translate_const"])), _translate_y),
    "TranslateXRel": (_signed(lambda hp: hp.get("translate_pct", 0.45)), _translate_x_rel),
    "TranslateYRel": (_signed(lambda hp: hp.get("translate_pct", 0.45)), _translate_y_rel),
}


def op_argument(name: str, magnitude: torch.Tensor, sign: torch.Tensor, hparams: dict) -> torch.Tensor | None:
    """timm's `LEVEL_TO_ARG[name](magnitude, hparams)[0]` for a tensor of magnitudes, with the sign
    timm would draw given explicitly."""
    level_to_arg = OPS[name][0]
    return None if level_to_arg is None else level_to_arg(magnitude / LEVEL_DENOM, sign, hparams)


# --------------------------------------------------------------------------------------------------
# The policy and its per-image draws
# --------------------------------------------------------------------------------------------------


@dataclass
class Layer:
    """One RandAugment layer's draws for a batch, one entry per image (CPU tensors)."""

    op: torch.Tensor  # int64 index into the op list, uniform with replacement (np.random.choice)
    applied: torch.Tensor  # bool: timm skips an op when random() > prob
    magnitude: torch.Tensor  # float64, N(m, mstd) (uniform(0, m) for mstd inf) clipped to [0, 10]
    sign: torch.Tensor  # float64 +-1: timm's _randomly_negate for ops whose argument has a sign


class RandAugmentPolicy:
    """timm's `rand_augment_transform(config_str, hparams)`, read from the object timm builds."""

    def __init__(self, config_str: str, img_size: int, interpolation: str):
        if not config_str.startswith("rand"):
            raise UserError(f"auto_augment={config_str!r}: {SUPPORTED}")
        if interpolation != "bicubic":
            raise UserError(f"train_interpolation={interpolation!r} with auto_augment: {SUPPORTED}")
        # The hparams timm's create_transform passes (see transforms.train_transform).
        hparams = {
            "translate_const": int(img_size * 0.45),
            "img_mean": tuple(min(255, round(255 * x)) for x in IMAGENET_DEFAULT_MEAN),
            "interpolation": str_to_pil_interp(interpolation),
        }
        try:
            timm_policy = rand_augment_transform(config_str, hparams)
        except (AssertionError, ValueError) as error:
            raise UserError(
                f"auto_augment={config_str!r} is not a valid timm RandAugment string ({error}): {SUPPORTED}"
            ) from None
        problems = [f"op {op.name}" for op in timm_policy.ops if op.name not in OPS]
        problems += ["mmax"] if any(op.magnitude_max is not None for op in timm_policy.ops) else []
        problems += ["weighted op choice"] if timm_policy.choice_weights is not None else []
        if problems:
            raise UserError(f"auto_augment={config_str!r} (unsupported: {', '.join(problems)}): {SUPPORTED}")
        self.ops = timm_policy.ops
        self.num_layers = timm_policy.num_layers
        self.hparams = timm_policy.ops[0].hparams
        self.fill = tuple(timm_policy.ops[0].kwargs["fillcolor"])
        self._prob = torch.tensor([op.prob for op in self.ops], dtype=torch.float64)
        self._magnitude = torch.tensor([op.magnitude for op in self.ops], dtype=torch.float64)
        self._magnitude_std = torch.tensor([op.magnitude_std for op in self.ops], dtype=torch.float64)

    def draw(self, batch_size: int, generator: torch.Generator) -> list[Layer]:
        """Every random choice for a batch, from `generator` (a CPU one: the same draws on any device)."""
        layers = []
        for _ in range(self.num_layers):
            op = torch.randint(len(self.ops), (batch_size,), generator=generator)
            u_apply, u_sign, u_uniform = torch.rand(3, batch_size, generator=generator, dtype=torch.float64)
            normal = torch.randn(batch_size, generator=generator, dtype=torch.float64)
            mean, std = self._magnitude[op], self._magnitude_std[op]
            magnitude = torch.where(std.isinf(), u_uniform * mean, mean + std * normal)
            layers.append(
                Layer(
                    op=op,
                    applied=u_apply <= self._prob[op],
                    magnitude=magnitude.clamp(0.0, LEVEL_DENOM),
                    sign=torch.where(u_sign > 0.5, -1.0, 1.0).to(torch.float64),
                )
            )
        return layers

    def apply(self, images: torch.Tensor, layers: list[Layer]) -> torch.Tensor:
        """Run each layer's ops on `images` (uint8, modified in place), grouped by op."""
        for layer in layers:
            for k, op in enumerate(self.ops):
                index = torch.nonzero(layer.applied & (layer.op == k)).flatten()
                if len(index) == 0:
                    continue
                argument = op_argument(op.name, layer.magnitude[index], layer.sign[index], self.hparams)
                tensor_op = OPS[op.name][1]
                for part in _chunks(len(index), images.device):
                    rows = index[part].to(images.device)
                    arg = None if argument is None else argument[part].view(-1, 1, 1, 1)  # ops move what they need
                    _write_rows(images, rows, tensor_op(images.index_select(0, rows), arg, self.fill))
        return images


def _write_rows(images, rows, values):
    """images[rows] = values. On the CPU as slice copies: index_put_ and index_copy_ measured ~70 us
    per 224 x 224 image there (a slice copy: ~2 us), which was 10% of the whole augmentation."""
    if images.device.type == "cpu":
        for value, row in zip(values, rows.tolist()):
            images[row].copy_(value)
    else:
        images.index_copy_(0, rows, values)


# --------------------------------------------------------------------------------------------------
# Random erasing
# --------------------------------------------------------------------------------------------------


class SeededRandomErasing(RandomErasing):
    """timm's RandomErasing (its parameters and its sampling, line for line), drawing from a
    `random.Random` and a torch generator passed in rather than from the global RNGs."""

    def erase_(self, images: torch.Tensor, rng: random.Random, noise: torch.Generator) -> torch.Tensor:
        _, chan, img_h, img_w = images.shape
        area = img_h * img_w
        batch_start = len(images) // self.num_splits if self.num_splits > 1 else 0
        for img in images[batch_start:]:
            if rng.random() > self.probability:
                continue
            count = self.min_count if self.min_count == self.max_count else rng.randint(self.min_count, self.max_count)
            for _ in range(count):
                for _attempt in range(10):
                    target_area = rng.uniform(self.min_area, self.max_area) * area / count
                    aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
                    h = round(math.sqrt(target_area * aspect_ratio))
                    w = round(math.sqrt(target_area / aspect_ratio))
                    if w < img_w and h < img_h:
                        top = rng.randint(0, img_h - h)
                        left = rng.randint(0, img_w - w)
                        img[:, top : top + h, left : left + w] = self._pixels((chan, h, w), images, noise)
                        break
        return images

    def _pixels(self, size, images, noise):
        if self.per_pixel:
            return torch.randn(size, generator=noise, dtype=images.dtype, device=images.device)
        if self.rand_color:
            return torch.randn((size[0], 1, 1), generator=noise, dtype=images.dtype, device=images.device)
        return torch.zeros((size[0], 1, 1), dtype=images.dtype, device=images.device)


# --------------------------------------------------------------------------------------------------
# The loader's entry point
# --------------------------------------------------------------------------------------------------


class BatchAugment:
    """uint8 NCHW batch (RRC + flip already done) -> normalised float32 NCHW, recipe augmentations per sample."""

    def __init__(self, aug_cfg, img_size: int):
        auto_augment = aug_cfg.get("auto_augment")
        if not auto_augment and aug_cfg.get("color_jitter"):
            raise UserError(f"color_jitter={aug_cfg.get('color_jitter')} without auto_augment: {SUPPORTED}")
        self.rand_augment = (
            RandAugmentPolicy(str(auto_augment), img_size, aug_cfg.get("train_interpolation", "bicubic"))
            if auto_augment
            else None
        )
        self.erasing = None
        if aug_cfg.get("reprob", 0) > 0:
            remode = aug_cfg.get("remode", "pixel")
            try:
                self.erasing = SeededRandomErasing(aug_cfg.reprob, mode=remode, max_count=aug_cfg.get("recount", 1), device="cpu")
            except AssertionError:
                raise UserError(f"remode={remode!r}: random erasing modes are 'const', 'rand' and 'pixel'") from None

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        generator = torch.Generator().manual_seed(seed % 2**64)
        # Sub-seeds for the erasing boxes and noise, drawn first so the RandAugment draws below do
        # not depend on whether erasing is on.
        erase_seed, noise_seed = torch.randint(2**62, (2,), generator=generator).tolist()
        if self.rand_augment is not None:
            layers = self.rand_augment.draw(images.shape[0], generator)
            images = self.rand_augment.apply(images.clone(), layers)
        out = normalize(images)
        if self.erasing is not None:
            noise = torch.Generator(device=out.device).manual_seed(noise_seed)
            self.erasing.erase_(out, random.Random(erase_seed), noise)
        return out
