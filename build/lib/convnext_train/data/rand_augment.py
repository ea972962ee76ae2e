"""timm's RandAugment (`rand-m9-mstd0.5-inc1`, the recipe's, and the other `rand-...` strings),
compiled with numba and run per image inside FFCV's decoding threads, right after the crop and flip.

Why here and by hand: timm's RandAugment works on one PIL image at a time in Python, which FFCV's
compiled, GIL-free pipeline cannot call, and torchvision's `v2.RandAugment` applies one op with one
magnitude to a whole batch and has neither timm's magnitude noise (`mstd`) nor its "increasing" op
set. The policy (ops, probabilities, magnitudes, noise, number of layers) is read from the object
timm's own `rand_augment_transform` builds; each op is written again here on an (H, W, 3) uint8 image
to give exactly what timm's PIL op gives, bit for bit: the colour and point ops with PIL's integer and
float32 arithmetic, truncations and table clipping; the geometric ops with PIL's affine transform,
its bicubic filter (a = -1, taps clamped to the image, double precision) and the fill colour outside.

Where: a first version ran these ops on whole batches of torch tensors after FFCV (one op on many
images at a time, "on the device"). On a CPU-only machine that took 108 ms of two threads per batch of
128; here each op is one pass over one image still in cache, in the decoding threads, about 0.3 ms
per image on average (one op per image: two layers at p = 0.5), 38 core-ms per batch (BENCHMARKS.md).
On a GPU machine this is CPU time the batched version left to the GPU: about a third of what FFCV's
decode, crop and flip cost per image.

Randomness: image i of epoch e draws from the counter-based generator keyed by (seed, e, i)
(`compiled`), draw numbers RAND_AUGMENT_DRAW onwards (the crop and flip use the first 41), so
its ops do not depend on the thread, rank or batch that decodes it, nor on a resume.

One module (policy, point, blend and geometric ops), not several: each op is read side by side with
the timm op it must match bit for bit, and numba's on-disk cache is invalidated only by a change to
the file of the function it cached, so ops split across files would leave `apply_op`'s cached copy
of an edited op stale.
"""

from __future__ import annotations

import math

import numpy as np
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_pil_interp

from convnext_train.data.compiled import jit, uniform
from convnext_train.errors import UserError

__all__ = [
    "OP_CODES",
    "RandAugmentPolicy",
    "apply_op",
    "draw_layer",
    "op_argument",
    "rand_augment",
    "rand_augment_policy",
]

SUPPORTED = (
    "the FFCV path's RandAugment supports timm strings 'rand-m<M>[-n<N>][-p<P>][-mstd<S>][-inc<0|1>]' "
    "with train_interpolation bicubic (no AutoAugment/AugMix policies, no 'mmax', no 't' op sets), and no colour "
    "jitter without RandAugment"
)

# timm's `_LEVEL_DENOM`: magnitude M means level M / 10, and magnitudes are clipped to [0, 10].
LEVEL_DENOM = 10.0
RAND_AUGMENT_DRAW = 64  # the first draw number of RandAugment; each layer takes DRAWS_PER_LAYER
DRAWS_PER_LAYER = 8
OUTSIDE = -(1 << 40)  # a tap index no image has: the point is outside, its pixel gets the fill

# Op codes (numba compiles a branch per code). Names are timm's.
(
    AUTO_CONTRAST,
    EQUALIZE,
    INVERT,
    ROTATE,
    POSTERIZE,
    POSTERIZE_INCREASING,
    POSTERIZE_ORIGINAL,
    SOLARIZE,
    SOLARIZE_INCREASING,
    SOLARIZE_ADD,
    COLOR,
    COLOR_INCREASING,
    CONTRAST,
    CONTRAST_INCREASING,
    BRIGHTNESS,
    BRIGHTNESS_INCREASING,
    SHARPNESS,
    SHARPNESS_INCREASING,
    SHEAR_X,
    SHEAR_Y,
    TRANSLATE_X,
    TRANSLATE_Y,
    TRANSLATE_X_REL,
    TRANSLATE_Y_REL,
) = range(24)
OP_CODES = {
    "AutoContrast": AUTO_CONTRAST,
    "Equalize": EQUALIZE,
    "Invert": INVERT,
    "Rotate": ROTATE,
    "Posterize": POSTERIZE,
    "PosterizeIncreasing": POSTERIZE_INCREASING,
    "PosterizeOriginal": POSTERIZE_ORIGINAL,
    "Solarize": SOLARIZE,
    "SolarizeIncreasing": SOLARIZE_INCREASING,
    "SolarizeAdd": SOLARIZE_ADD,
    "Color": COLOR,
    "ColorIncreasing": COLOR_INCREASING,
    "Contrast": CONTRAST,
    "ContrastIncreasing": CONTRAST_INCREASING,
    "Brightness": BRIGHTNESS,
    "BrightnessIncreasing": BRIGHTNESS_INCREASING,
    "Sharpness": SHARPNESS,
    "SharpnessIncreasing": SHARPNESS_INCREASING,
    "ShearX": SHEAR_X,
    "ShearY": SHEAR_Y,
    "TranslateX": TRANSLATE_X,
    "TranslateY": TRANSLATE_Y,
    "TranslateXRel": TRANSLATE_X_REL,
    "TranslateYRel": TRANSLATE_Y_REL,
}


# --------------------------------------------------------------------------------------------------
# The policy
# --------------------------------------------------------------------------------------------------
def rand_augment_policy(aug_cfg, img_size: int) -> RandAugmentPolicy | None:
    """The `aug` config's RandAugment (None for auto_augment=null), or one line saying what the FFCV
    path cannot do."""
    auto_augment = aug_cfg.get("auto_augment")
    if not auto_augment:
        if aug_cfg.get("color_jitter"):
            raise UserError(f"color_jitter={aug_cfg.get('color_jitter')} without auto_augment: {SUPPORTED}")
        return None
    return RandAugmentPolicy(str(auto_augment), img_size, aug_cfg.get("train_interpolation", "bicubic"))


class RandAugmentPolicy:
    """timm's `rand_augment_transform(config_str, hparams)`, read from the object timm builds, as the
    arrays the compiled `rand_augment` takes (`arguments`)."""

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
        problems = [f"op {op.name}" for op in timm_policy.ops if op.name not in OP_CODES]
        problems += ["mmax"] if any(op.magnitude_max is not None for op in timm_policy.ops) else []
        problems += ["weighted op choice"] if timm_policy.choice_weights is not None else []
        if problems:
            raise UserError(f"auto_augment={config_str!r} (unsupported: {', '.join(problems)}): {SUPPORTED}")
        self.ops = [op.name for op in timm_policy.ops]
        self.num_layers = timm_policy.num_layers
        self.hparams = timm_policy.ops[0].hparams
        self.fill = tuple(timm_policy.ops[0].kwargs["fillcolor"])
        self.codes = np.array([OP_CODES[name] for name in self.ops], dtype=np.int64)
        self.probs = np.array([op.prob for op in timm_policy.ops], dtype=np.float64)
        self.magnitudes = np.array([op.magnitude for op in timm_policy.ops], dtype=np.float64)
        self.magnitude_stds = np.array([op.magnitude_std for op in timm_policy.ops], dtype=np.float64)

    def arguments(self) -> tuple:
        """What `rand_augment(image, key, *arguments)` needs besides the image and its key."""
        return (
            self.codes,
            self.probs,
            self.magnitudes,
            self.magnitude_stds,
            self.num_layers,
            np.array(self.fill, dtype=np.uint8),
            float(self.hparams["translate_const"]),
            float(self.hparams.get("translate_pct", 0.45)),
        )


@jit
def rand_augment(
    image, key, codes, probs, magnitudes, magnitude_stds, num_layers, fill, translate_const, translate_pct
):
    """timm's `RandAugment.__call__` on one (H, W, 3) uint8 image, in place, its draws keyed by `key`."""
    for layer in range(num_layers):
        k, applied, magnitude, sign = draw_layer(key, layer, probs, magnitudes, magnitude_stds)
        if applied:
            code = codes[k]
            apply_op(image, code, op_argument(code, magnitude, sign, translate_const, translate_pct), fill)


@jit
def draw_layer(key, layer, probs, magnitudes, magnitude_stds):
    """One layer's draws, as timm makes them: the op (uniform, with replacement across layers),
    whether it applies (timm skips it when random() > prob), its magnitude N(m, mstd) (uniform(0, m)
    for mstd inf) clipped to [0, 10], and the sign timm's `_randomly_negate` would give its argument."""
    draw = RAND_AUGMENT_DRAW + DRAWS_PER_LAYER * layer
    count = len(probs)
    k = min(np.int64(uniform(key, draw) * count), count - 1)
    applied = uniform(key, draw + 1) <= probs[k]
    magnitude, std = magnitudes[k], magnitude_stds[k]
    if np.isinf(std):
        magnitude = uniform(key, draw + 2) * magnitude
    elif std > 0.0:
        radius = np.sqrt(-2.0 * np.log(1.0 - uniform(key, draw + 2)))  # Box-Muller
        magnitude = magnitude + std * radius * np.cos(2.0 * np.pi * uniform(key, draw + 3))
    magnitude = min(max(magnitude, 0.0), LEVEL_DENOM)
    sign = -1.0 if uniform(key, draw + 4) > 0.5 else 1.0
    return k, applied, magnitude, sign


@jit
def op_argument(code, magnitude, sign, translate_const, translate_pct):
    """timm's `LEVEL_TO_ARG[name](magnitude, hparams)[0]`, with the sign timm would draw given
    explicitly (timm negates some arguments when random() > 0.5). 0 for ops without an argument."""
    level = magnitude / LEVEL_DENOM
    if code == ROTATE:
        return level * 30.0 * sign
    if code == POSTERIZE:
        return np.floor(level * 4)
    if code == POSTERIZE_INCREASING:
        return 4 - np.floor(level * 4)
    if code == POSTERIZE_ORIGINAL:
        return np.floor(level * 4) + 4
    if code == SOLARIZE:
        return min(256.0, np.floor(level * 256))
    if code == SOLARIZE_INCREASING:
        return 256 - min(256.0, np.floor(level * 256))
    if code == SOLARIZE_ADD:
        return min(128.0, np.floor(level * 110))
    if code == COLOR or code == CONTRAST or code == BRIGHTNESS or code == SHARPNESS:
        return level * 1.8 + 0.1
    if (
        code == COLOR_INCREASING
        or code == CONTRAST_INCREASING
        or code == BRIGHTNESS_INCREASING
        or code == SHARPNESS_INCREASING
    ):
        return max(0.1, 1.0 + sign * (level * 0.9))
    if code == SHEAR_X or code == SHEAR_Y:
        return level * 0.3 * sign
    if code == TRANSLATE_X or code == TRANSLATE_Y:
        return level * translate_const * sign
    if code == TRANSLATE_X_REL or code == TRANSLATE_Y_REL:
        return level * translate_pct * sign
    return 0.0


@jit
def apply_op(image, code, argument, fill):
    """timm's op `code` with its argument (as `op_argument` gives it) on an (H, W, 3) uint8 image, in
    place; `fill` (3 uint8) is the colour the geometric ops give to points outside the image."""
    height, width = image.shape[0], image.shape[1]
    if code == AUTO_CONTRAST:
        autocontrast(image)
    elif code == EQUALIZE:
        equalize(image)
    elif code == INVERT:
        invert(image)
    elif code == POSTERIZE or code == POSTERIZE_INCREASING or code == POSTERIZE_ORIGINAL:
        posterize(image, np.int64(argument))
    elif code == SOLARIZE or code == SOLARIZE_INCREASING:
        solarize(image, np.int64(argument))
    elif code == SOLARIZE_ADD:
        solarize_add(image, np.int64(argument))
    elif code == COLOR or code == COLOR_INCREASING:
        color(image, argument)
    elif code == CONTRAST or code == CONTRAST_INCREASING:
        contrast(image, argument)
    elif code == BRIGHTNESS or code == BRIGHTNESS_INCREASING:
        brightness(image, argument)
    elif code == SHARPNESS or code == SHARPNESS_INCREASING:
        sharpness(image, argument)
    elif code == ROTATE:
        rotate(image, argument, fill)
    elif code == SHEAR_X:
        affine_along_x(image, argument, 0.0, fill)
    elif code == SHEAR_Y:
        affine_along_y(image, argument, 0.0, fill)
    elif code == TRANSLATE_X:
        affine_along_x(image, 0.0, argument, fill)
    elif code == TRANSLATE_Y:
        affine_along_y(image, 0.0, argument, fill)
    elif code == TRANSLATE_X_REL:
        affine_along_x(image, 0.0, argument * width, fill)  # timm: pct * width pixels
    elif code == TRANSLATE_Y_REL:
        affine_along_y(image, 0.0, argument * height, fill)


# --------------------------------------------------------------------------------------------------
# Point ops: PIL's Image.point with one table per channel
# --------------------------------------------------------------------------------------------------
@jit
def apply_lut(image, lut):
    """lut: (3, 256) uint8."""
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = lut[c, image[y, x, c]]


@jit
def same_lut(values):
    """One table (256 integers, clipped to 0..255 as PIL's point clips) for all three channels."""
    lut = np.empty((3, 256), dtype=np.uint8)
    for c in range(3):
        for i in range(256):
            lut[c, i] = min(max(values[i], 0), 255)
    return lut


@jit
def invert(image):
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = 255 - image[y, x, c]


@jit
def posterize(image, bits):
    """Keep the top `bits` bits (ImageOps.posterize); >= 8 keeps the image, 0 gives black (as the
    repo's repaired timm op does: `transforms.posterize_zero_bits_black`)."""
    if bits >= 8:
        return
    mask = (255 << (8 - max(bits, 0))) & 255
    values = np.empty(256, dtype=np.int64)
    for i in range(256):
        values[i] = i & mask
    apply_lut(image, same_lut(values))


@jit
def solarize(image, threshold):
    values = np.empty(256, dtype=np.int64)
    for i in range(256):
        values[i] = i if i < threshold else 255 - i
    apply_lut(image, same_lut(values))


@jit
def solarize_add(image, add):
    """timm's solarize_add: values below 128 get `add`, capped at 255."""
    values = np.empty(256, dtype=np.int64)
    for i in range(256):
        values[i] = min(255, i + add) if i < 128 else i
    apply_lut(image, same_lut(values))


@jit
def channel_histograms(image):
    hist = np.zeros((3, 256), dtype=np.int64)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                hist[c, image[y, x, c]] += 1
    return hist


@jit
def autocontrast(image):
    """ImageOps.autocontrast (cutoff 0), per channel: lut[i] = int(i * scale + offset) clipped to
    0..255 with scale = 255 / (hi - lo) and offset = -lo * scale in double precision, as PIL's Python
    code computes them; the identity for a flat channel."""
    hist = channel_histograms(image)
    lut = np.empty((3, 256), dtype=np.uint8)
    for c in range(3):
        lo, hi = 0, 255
        while lo < 255 and hist[c, lo] == 0:
            lo += 1
        while hi > 0 and hist[c, hi] == 0:
            hi -= 1
        if hi <= lo:
            for i in range(256):
                lut[c, i] = i
            continue
        scale = 255.0 / (hi - lo)
        offset = -lo * scale
        for i in range(256):
            lut[c, i] = min(max(np.int64(i * scale + offset), 0), 255)  # int() truncates; negatives clip to 0
    apply_lut(image, lut)


@jit
def equalize(image):
    """ImageOps.equalize, per channel: step = (pixels - count of the last used value) // 255,
    lut[i] = (step // 2 + pixels below i) // step, clipped to 255; the identity when step is 0 or
    only one value is used."""
    hist = channel_histograms(image)
    pixels = image.shape[0] * image.shape[1]
    lut = np.empty((3, 256), dtype=np.uint8)
    for c in range(3):
        last = 255
        while last > 0 and hist[c, last] == 0:
            last -= 1
        step = (pixels - hist[c, last]) // 255
        if step == 0:  # also covers a single used value
            for i in range(256):
                lut[c, i] = i
            continue
        below = step // 2
        for i in range(256):
            lut[c, i] = min(below // step, 255)
            below += hist[c, i]
    apply_lut(image, lut)


# --------------------------------------------------------------------------------------------------
# Blend ops: PIL's ImageEnhance, i.e. Image.blend(degenerate, image, factor)
# --------------------------------------------------------------------------------------------------
@jit
def blend(degenerate, value, alpha):
    """PIL's ImagingBlend for one value: float32 `in1 + alpha * (in2 - in1)`, clipped, truncated."""
    mixed = np.float32(degenerate) + alpha * np.float32(np.int64(value) - np.int64(degenerate))
    return np.uint8(min(max(mixed, np.float32(0.0)), np.float32(255.0)))


@jit
def luma(r, g, b):
    """PIL's RGB -> L conversion."""
    return (np.int64(r) * 19595 + np.int64(g) * 38470 + np.int64(b) * 7471 + 0x8000) >> 16


@jit
def color(image, factor):
    alpha = np.float32(factor)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            grey = luma(image[y, x, 0], image[y, x, 1], image[y, x, 2])
            for c in range(3):
                image[y, x, c] = blend(grey, image[y, x, c], alpha)


@jit
def contrast(image, factor):
    """The degenerate image is the grey level int(mean(L) + 0.5)."""
    total = 0
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            total += luma(image[y, x, 0], image[y, x, 1], image[y, x, 2])
    grey = np.int64(total / (image.shape[0] * image.shape[1]) + 0.5)
    alpha = np.float32(factor)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = blend(grey, image[y, x, c], alpha)


@jit
def brightness(image, factor):
    """The degenerate image is black."""
    alpha = np.float32(factor)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            for c in range(3):
                image[y, x, c] = blend(0, image[y, x, c], alpha)


@jit
def sharpness(image, factor):
    """The degenerate image is PIL's SMOOTH filter ([[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded,
    border pixels copied). PIL sums in float32 with 1/13 weights; (2 S + 13) // 26, the rounding of
    S / 13 for the integer sum S, is the same number (the true value is never within 1/26 of a
    rounding edge). Border pixels blend with themselves, which leaves them as they are."""
    height, width = image.shape[0], image.shape[1]
    source = image.copy()
    alpha = np.float32(factor)
    for y in range(1, height - 1):
        for x in range(1, width - 1):
            for c in range(3):
                total = np.int32(source[y, x, c]) * 4
                for dy in range(-1, 2):
                    for dx in range(-1, 2):
                        total += source[y + dy, x + dx, c]
                image[y, x, c] = blend(np.uint32(2 * total + 13) // np.uint32(26), source[y, x, c], alpha)


# --------------------------------------------------------------------------------------------------
# Geometric ops: PIL's Image.transform(AFFINE, BICUBIC, fillcolor=fill)
# --------------------------------------------------------------------------------------------------
@jit
def cubic(v1, v2, v3, v4, d):
    """PIL's BICUBIC macro (Geometry.c, a = -1), in its own order of double operations."""
    p1 = v2
    p2 = -v1 + v3
    p3 = 2 * (v1 - v2) + v3 - v4
    p4 = -v1 + v2 - v3 + v4
    return p1 + d * (p2 + d * (p3 + d * p4))


@jit
def to_uint8(value):
    """PIL's store of a filtered value: 0 at or below 0, 255 at or above 255, else truncated
    (written without branches, which lets the compiler vectorise the loops that call it)."""
    return np.uint8(min(max(value, 0.0), 255.0))


@jit
def clamp(index, size):
    return min(max(index, 0), size - 1)


@jit
def first_tap(position, size):
    """PIL's bicubic taps along one axis for a point at `position` (pixel centres at k + 0.5): the
    first of its four pixels (before clamping to the image) and the fraction past the second; OUTSIDE
    for a point outside [0, size), whose pixel gets the fill."""
    if position < 0.0 or position >= size:
        return OUTSIDE, 0.0
    base = np.floor(position - 0.5)
    return np.int64(base) - 1, (position - 0.5) - base


@jit
def affine(image, a, b, c, d, e, f, fill):
    """Each output pixel (x, y) samples the input at (a x' + b y' + c, d x' + e y' + f), (x', y') its
    centre, with PIL's bicubic filter; points outside the image get `fill`."""
    height, width = image.shape[0], image.shape[1]
    source = image.astype(np.float64)  # converted once: each value is read by up to 16 output pixels
    for y in range(height):
        yc = y + 0.5
        for x in range(width):
            xc = x + 0.5
            left, dx = first_tap(a * xc + b * yc + c, width)
            top, dy = first_tap(d * xc + e * yc + f, height)
            if left == OUTSIDE or top == OUTSIDE:
                for ch in range(3):
                    image[y, x, ch] = fill[ch]
                continue
            x0, x1, x2, x3 = clamp(left, width), clamp(left + 1, width), clamp(left + 2, width), clamp(left + 3, width)
            r0, r1, r2, r3 = (
                source[clamp(top, height)],
                source[clamp(top + 1, height)],
                source[clamp(top + 2, height)],
                source[clamp(top + 3, height)],
            )
            for ch in range(3):
                v1 = cubic(r0[x0, ch], r0[x1, ch], r0[x2, ch], r0[x3, ch], dx)
                v2 = cubic(r1[x0, ch], r1[x1, ch], r1[x2, ch], r1[x3, ch], dx)
                v3 = cubic(r2[x0, ch], r2[x1, ch], r2[x2, ch], r2[x3, ch], dx)
                v4 = cubic(r3[x0, ch], r3[x1, ch], r3[x2, ch], r3[x3, ch], dx)
                image[y, x, ch] = to_uint8(cubic(v1, v2, v3, v4, dy))


@jit
def affine_along_x(image, b, c, fill):
    """`affine` with the matrix (1, b, c, 0, 1, 0) (shear x, translate x). The sampled row is then
    exactly the pixel's own, where PIL's filter gives that row's value (its weight is 1, the others'
    0), so four taps along x give PIL's result. Each row's taps and weights are worked out once
    for the row (for a translation, once for the image: they do not depend on the row)."""
    height, width = image.shape[0], image.shape[1]
    source = image.copy()
    first = np.empty(width, dtype=np.int64)  # the first tap (clamped later), or OUTSIDE for the fill
    fraction = np.empty(width, dtype=np.float64)
    for y in range(height):
        if y == 0 or b != 0.0:
            offset = b * (y + 0.5)
            for x in range(width):
                first[x], fraction[x] = first_tap(1.0 * (x + 0.5) + offset + c, width)
        for x in range(width):
            left = first[x]
            if left == OUTSIDE:
                for ch in range(3):
                    image[y, x, ch] = fill[ch]
                continue
            x0, x1, x2, x3 = clamp(left, width), clamp(left + 1, width), clamp(left + 2, width), clamp(left + 3, width)
            dx = fraction[x]
            for ch in range(3):
                value = cubic(
                    np.float64(source[y, x0, ch]),
                    np.float64(source[y, x1, ch]),
                    np.float64(source[y, x2, ch]),
                    np.float64(source[y, x3, ch]),
                    dx,
                )
                image[y, x, ch] = to_uint8(value)


@jit
def affine_along_y(image, d, f, fill):
    """`affine` with the matrix (1, 0, 0, d, 1, f) (shear y, translate y): four taps along y. For a
    translation each output row mixes four whole source rows with one set of weights."""
    height, width = image.shape[0], image.shape[1]
    if d == 0.0:
        rows, out = image.copy().reshape(height, width * 3), image.reshape(height, width * 3)
        for y in range(height):
            top, dy = first_tap(1.0 * (y + 0.5) + f, height)  # PIL's d x' + e y' + f with d = 0, e = 1
            if top == OUTSIDE:
                for x in range(width):
                    for ch in range(3):
                        image[y, x, ch] = fill[ch]
                continue
            r0, r1, r2, r3 = (
                rows[clamp(top, height)],
                rows[clamp(top + 1, height)],
                rows[clamp(top + 2, height)],
                rows[clamp(top + 3, height)],
            )
            row = out[y]
            for i in range(width * 3):
                row[i] = to_uint8(cubic(np.float64(r0[i]), np.float64(r1[i]), np.float64(r2[i]), np.float64(r3[i]), dy))
        return
    # A shear along y is a shear along x of the transposed image: PIL's d x' + y' + f there is
    # x'' + d y'' + f here, the same sum.
    affine_along_x(image.transpose(1, 0, 2), d, f, fill)


@jit
def round15(value):
    """Python's round(value, 15) for |value| <= 1, as PIL's rotate rounds its matrix."""
    return np.round(value * 1e15) / 1e15


@jit
def rotate(image, degrees, fill):
    """PIL's Image.rotate(degrees) about the centre, same size: the matrix it hands to transform."""
    height, width = image.shape[0], image.shape[1]
    angle = degrees % 360.0
    if angle == 0.0:
        return
    angle = -(angle * (math.pi / 180.0))
    a, b = round15(math.cos(angle)), round15(math.sin(angle))
    d, e = round15(-math.sin(angle)), round15(math.cos(angle))
    cx, cy = width / 2.0, height / 2.0
    c = a * -cx + b * -cy + 0.0 + cx
    f = d * -cx + e * -cy + 0.0 + cy
    affine(image, a, b, c, d, e, f, fill)
