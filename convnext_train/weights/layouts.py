"""Parameter layouts: the names (and sometimes shapes) that each source gives the same tensors, and
conversion between them and the official facebookresearch layout that our models use.

One section per layout: timm, Hugging Face `transformers`, torchvision, ConvNeXt V2 FCMAE
pre-training (read only), ResNet (torchvision's and timm's, read only: the roadmap's first step); then `detect_format` and `to_official`, which dispatch on them. A new
layout is a new section with its `*_to_official`, one marker in `detect_format` and one entry in
`to_official`'s table (one module over 400 lines: the layouts share the renaming rules, and
`detect_format` must weigh every layout's marker against the others). `architecture` reads the depths and widths off official weights, for the
exports and for telling which model a checkpoint is for (`loading.Architecture`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from torch import Tensor, nn

from convnext_train.weights.errors import CheckpointError

__all__ = [
    "FCMAE_DROPPED",
    "FCMAE_MISSING",
    "TORCHVISION_SIZES",
    "architecture",
    "detect_format",
    "fcmae_from_release",
    "fcmae_to_official",
    "fcmae_to_release",
    "hf_to_official",
    "is_isotropic",
    "is_v2",
    "official_to_hf",
    "official_to_timm",
    "official_to_torchvision",
    "reject_other_networks",
    "resnet_to_official",
    "timm_to_official",
    "to_official",
    "torchvision_to_official",
]


# --------------------------------------------------------------------------------------------------
# Renaming rules shared by every layout, both directions
# --------------------------------------------------------------------------------------------------
# A rule pairs an official name template with the other layout's, e.g.
# ("stages.{i}.{j}.dwconv.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"); {p} is `weight` or `bias`,
# {n} any tensor of a norm (BatchNorm's running statistics and counter too), any other placeholder a
# number. Rules are tried in order; a name no rule matches is kept, so that
# load_weights reports it as an unexpected key.
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_PLACEHOLDER_PATTERNS = {
    "p": r"(?P<{name}>weight|bias)",
    "n": r"(?P<{name}>weight|bias|running_mean|running_var|num_batches_tracked)",
}
_Rules = list[tuple[re.Pattern[str], str]]


def _template_pattern(template: str) -> re.Pattern[str]:
    pieces = _PLACEHOLDER.split(template)  # literal, placeholder, literal, ..., literal
    regex = ""
    for index, piece in enumerate(pieces):
        if index % 2 == 0:
            regex += re.escape(piece)
        else:
            regex += _PLACEHOLDER_PATTERNS.get(piece, r"(?P<{name}>\d+)").format(name=piece)
    return re.compile(regex)


def _compile_rules(pairs: list[tuple[str, str]]) -> tuple[_Rules, _Rules]:
    """(official -> other, other -> official) rules from (official template, other template) pairs."""
    to_other = [(_template_pattern(official), other) for official, other in pairs]
    to_official = [(_template_pattern(other), official) for official, other in pairs]
    return to_other, to_official


def _rename(name: str, rules: _Rules) -> str:
    for pattern, template in rules:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return name


def is_isotropic(state_dict: Mapping[str, Tensor]) -> bool:
    return "stem.weight" in state_dict or any(name.startswith("blocks.") for name in state_dict)


def reject_other_networks(state_dict: Mapping[str, Tensor], target: str) -> None:
    """Only the hierarchical ConvNeXt (V1 or V2) has a `target` equivalent: not the isotropic one, and
    not the roadmap's steps before its last (a ResNet on its way to ConvNeXt)."""
    if is_isotropic(state_dict):
        raise CheckpointError(
            f"This is an isotropic ConvNeXt checkpoint, which has no {target} equivalent; keep it in the "
            "official format."
        )
    try:
        architecture(state_dict)
    except KeyError:
        raise CheckpointError(
            f"This is not a hierarchical ConvNeXt (a step of the paper's roadmap before its last?), which has no "
            f"{target} equivalent; keep it in the official format (or safetensors, or ONNX)."
        ) from None


def architecture(state_dict: Mapping[str, Tensor]) -> tuple[list[int], list[int]] | None:
    """(depths, dims) of official hierarchical weights (V1 or V2); None for an isotropic model."""
    if is_isotropic(state_dict):
        return None
    stages = range(4)
    # The stem is the first downsampling layer, conv then norm; the others are norm then conv.
    convolutions = ["downsample_layers.0.0.weight"] + [f"downsample_layers.{i}.1.weight" for i in stages[1:]]
    dims = [state_dict[name].shape[0] for name in convolutions]
    # Block names are `stages.<stage>.<block>.<...>`: count the distinct block indices per stage.
    depths = [len({name.split(".")[2] for name in state_dict if name.startswith(f"stages.{i}.")}) for i in stages]
    return depths, dims


# --------------------------------------------------------------------------------------------------
# timm (`timm.models.convnext.ConvNeXt`)
# --------------------------------------------------------------------------------------------------
_TIMM_TO, _TIMM_FROM = _compile_rules(
    [
        ("downsample_layers.0.{m}.{p}", "stem.{m}.{p}"),
        ("downsample_layers.{i}.{m}.{p}", "stages.{i}.downsample.{m}.{p}"),
        ("stages.{i}.{j}.dwconv.{p}", "stages.{i}.blocks.{j}.conv_dw.{p}"),
        ("stages.{i}.{j}.norm.{p}", "stages.{i}.blocks.{j}.norm.{p}"),
        ("stages.{i}.{j}.pwconv1.{p}", "stages.{i}.blocks.{j}.mlp.fc1.{p}"),
        ("stages.{i}.{j}.pwconv2.{p}", "stages.{i}.blocks.{j}.mlp.fc2.{p}"),
        ("stages.{i}.{j}.gamma", "stages.{i}.blocks.{j}.gamma"),
        ("stages.{i}.{j}.grn.gamma", "stages.{i}.blocks.{j}.mlp.grn.weight"),
        ("stages.{i}.{j}.grn.beta", "stages.{i}.blocks.{j}.mlp.grn.bias"),
        ("norm.{p}", "head.norm.{p}"),
        ("head.{p}", "head.fc.{p}"),
    ]
)
_TIMM_MLP_WEIGHT = re.compile(r"stages\.\d+\.blocks\.\d+\.mlp\.fc[12]\.weight")


def timm_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """timm names and shapes -> official ones.

    timm's small models (atto..nano) set `conv_mlp=True`: their MLP weights are 1x1 convolutions
    [out, in, 1, 1], which become the official Linear's [out, in]. timm keeps GRN parameters as (C,),
    the official code as (1, 1, 1, C).
    """
    converted = {}
    for name, tensor in state_dict.items():
        official_name = _rename(name, _TIMM_FROM)
        if official_name.endswith((".pwconv1.weight", ".pwconv2.weight")):
            tensor = tensor.flatten(1)
        elif official_name.endswith((".grn.gamma", ".grn.beta")):
            tensor = tensor.reshape(1, 1, 1, -1)
        converted[official_name] = tensor
    return converted


def official_to_timm(state_dict: Mapping[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """Official names and shapes -> timm ones.

    Pass the timm `model` when it uses `conv_mlp=True`: its MLP weights are then reshaped to its 1x1
    convolution shapes (a state dict alone does not say which of the two forms the target uses).
    """
    reject_other_networks(state_dict, "timm")
    target_shapes = {} if model is None else {name: tensor.shape for name, tensor in model.state_dict().items()}
    converted = {}
    for name, tensor in state_dict.items():
        timm_name = _rename(name, _TIMM_TO)
        if timm_name.endswith((".mlp.grn.weight", ".mlp.grn.bias")):
            tensor = tensor.reshape(-1)
        elif _TIMM_MLP_WEIGHT.fullmatch(timm_name) and timm_name in target_shapes:
            # Same element count: the 2-D <-> 1x1-conv case; anything else is a real mismatch that
            # the target's load_state_dict should report.
            if tensor.numel() == target_shapes[timm_name].numel():
                tensor = tensor.reshape(target_shapes[timm_name])
        converted[timm_name] = tensor
    return converted


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers (`ConvNextForImageClassification`, `ConvNextV2ForImageClassification`)
# --------------------------------------------------------------------------------------------------
# Names below the backbone prefix (`convnext.` or `convnextv2.`); the classifier sits outside it.
_HF_TO, _HF_FROM = _compile_rules(
    [
        ("downsample_layers.0.0.{p}", "embeddings.patch_embeddings.{p}"),
        ("downsample_layers.0.1.{p}", "embeddings.layernorm.{p}"),
        ("downsample_layers.{i}.{m}.{p}", "encoder.stages.{i}.downsampling_layer.{m}.{p}"),
        ("stages.{i}.{j}.dwconv.{p}", "encoder.stages.{i}.layers.{j}.dwconv.{p}"),
        ("stages.{i}.{j}.norm.{p}", "encoder.stages.{i}.layers.{j}.layernorm.{p}"),
        ("stages.{i}.{j}.pwconv1.{p}", "encoder.stages.{i}.layers.{j}.pwconv1.{p}"),
        ("stages.{i}.{j}.pwconv2.{p}", "encoder.stages.{i}.layers.{j}.pwconv2.{p}"),
        ("stages.{i}.{j}.gamma", "encoder.stages.{i}.layers.{j}.layer_scale_parameter"),
        ("stages.{i}.{j}.grn.gamma", "encoder.stages.{i}.layers.{j}.grn.weight"),
        ("stages.{i}.{j}.grn.beta", "encoder.stages.{i}.layers.{j}.grn.bias"),
        ("norm.{p}", "layernorm.{p}"),
        ("head.{p}", "classifier.{p}"),
    ]
)
_HF_BACKBONE_PREFIX = re.compile(r"^convnext(v2)?\.")


def hf_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face names -> official ones (the shapes are the same, GRN included)."""
    return {_rename(_HF_BACKBONE_PREFIX.sub("", name), _HF_FROM): tensor for name, tensor in state_dict.items()}


def official_to_hf(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official names -> those of `ConvNextForImageClassification`, or of the V2 class when the
    weights have GRN."""
    reject_other_networks(state_dict, "Hugging Face")
    prefix = "convnextv2." if is_v2(state_dict) else "convnext."
    converted = {}
    for name, tensor in state_dict.items():
        hf_name = _rename(name, _HF_TO)
        converted[hf_name if hf_name.startswith("classifier.") else prefix + hf_name] = tensor
    return converted


def is_v2(state_dict: Mapping[str, Tensor]) -> bool:
    return any(name.endswith(".grn.gamma") for name in state_dict)


def has_layer_scale(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether the blocks scale their branch (V1's `gamma`; a V1 built with layer_scale_init_value=0
    and every V2 have none)."""
    return any(_LAYER_SCALE.fullmatch(name) for name in state_dict)


_LAYER_SCALE = re.compile(r"stages\.\d+\.\d+\.gamma")


# --------------------------------------------------------------------------------------------------
# torchvision (`torchvision.models.convnext_tiny/small/base/large`)
# --------------------------------------------------------------------------------------------------
# torchvision numbers the stem, stages and downsampling layers as one `features` Sequential:
# features.0 is the stem, features.{2i+1} stage i, features.{2i} (i >= 1) the downsampling layer
# before it, each in the official order (conv then LayerNorm2d for the stem, LayerNorm2d then conv
# after). The rules below read that index as `down.{i}` / `stage.{i}`, which `_tv_index` converts.
# A block is Sequential(dwconv, Permute, LayerNorm, Linear, GELU, Linear, Permute) with its layer
# scale beside it, shaped (C, 1, 1) where the official gamma is (C,). The classifier is
# Sequential(LayerNorm2d, Flatten, Linear) on the pooled (N, C, 1, 1) map: the official `norm`
# (on the pooled (N, C)) and `head`. Every LayerNorm has eps 1e-6, as the official ones. Stochastic
# depth has no parameters (torchvision's "row" mode is per-sample drop path, rising linearly).
_TV_TO, _TV_FROM = _compile_rules(
    [
        ("downsample_layers.{i}.{m}.{p}", "down.{i}.{m}.{p}"),
        ("stages.{i}.{j}.dwconv.{p}", "stage.{i}.{j}.block.0.{p}"),
        ("stages.{i}.{j}.norm.{p}", "stage.{i}.{j}.block.2.{p}"),
        ("stages.{i}.{j}.pwconv1.{p}", "stage.{i}.{j}.block.3.{p}"),
        ("stages.{i}.{j}.pwconv2.{p}", "stage.{i}.{j}.block.5.{p}"),
        ("stages.{i}.{j}.gamma", "stage.{i}.{j}.layer_scale"),
        ("norm.{p}", "classifier.0.{p}"),
        ("head.{p}", "classifier.2.{p}"),
    ]
)
_TV_FEATURES = re.compile(r"^features\.(\d+)\.")
_TV_PART = re.compile(r"^(down|stage)\.(\d+)\.")
# torchvision's four builders: (depths, dims) -> our variant.
TORCHVISION_SIZES = {
    ((3, 3, 9, 3), (96, 192, 384, 768)): "convnext_t",
    ((3, 3, 27, 3), (96, 192, 384, 768)): "convnext_s",
    ((3, 3, 27, 3), (128, 256, 512, 1024)): "convnext_b",
    ((3, 3, 27, 3), (192, 384, 768, 1536)): "convnext_l",
}


def _tv_index(name: str, *, to_torchvision: bool) -> str:
    if to_torchvision:
        return _TV_PART.sub(lambda m: f"features.{2 * int(m[2]) + (m[1] == 'stage')}.", name, count=1)
    return _TV_FEATURES.sub(lambda m: f"{('down', 'stage')[int(m[1]) % 2]}.{int(m[1]) // 2}.", name, count=1)


def torchvision_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision names and shapes -> official ones."""
    converted = {}
    for name, tensor in state_dict.items():
        official_name = _rename(_tv_index(name, to_torchvision=False), _TV_FROM)
        converted[official_name] = tensor.reshape(-1) if official_name.endswith(".gamma") else tensor
    return converted


def official_to_torchvision(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official names and shapes -> what `torchvision.models.convnext_<size>(weights=None)` loads strictly.

    torchvision only builds ConvNeXt V1 in sizes T, S, B and L; anything else is refused. A model
    without layer scale (layer_scale_init_value=0) gets a scale of ones, which computes the same.
    """
    reject_other_networks(state_dict, "torchvision")
    if is_v2(state_dict):
        raise CheckpointError(
            "torchvision has no ConvNeXt V2; export this model with export_hf, or keep it in the official format."
        )
    depths, dims = architecture(state_dict)
    if (tuple(depths), tuple(dims)) not in TORCHVISION_SIZES:
        raise CheckpointError(
            f"torchvision builds ConvNeXt only in sizes T, S, B and L ({', '.join(TORCHVISION_SIZES.values())}); "
            f"this model has depths {depths} and dims {dims}: export it with export_hf or keep the official format."
        )
    state_dict = dict(state_dict)
    for i, depth in enumerate(depths):
        for j in range(depth):
            if f"stages.{i}.{j}.gamma" not in state_dict:
                state_dict[f"stages.{i}.{j}.gamma"] = state_dict[f"stages.{i}.{j}.norm.weight"].new_ones(dims[i])
    converted = {}
    for name, tensor in state_dict.items():
        tv_name = _tv_index(_rename(name, _TV_TO), to_torchvision=True)
        converted[tv_name] = tensor.reshape(-1, 1, 1) if tv_name.endswith(".layer_scale") else tensor
    return converted


# --------------------------------------------------------------------------------------------------
# ConvNeXt V2 FCMAE pre-training (the official `convnextv2_*_fcmae.pt` release)
# --------------------------------------------------------------------------------------------------
# The FCMAE encoder is a sparse (MinkowskiEngine) ConvNeXt V2 under `encoder.`; beside it sit the
# decoder, the mask token and the projection/prediction layers, which fine-tuning drops. Sparse
# modules store convolutions as `kernel` tensors of shape (k*k, in, out), or (k*k, C) depthwise,
# with the kernel's two spatial axes in the opposite order; LayerNorm and Linear weights one module
# deeper (`.ln.`, `.linear.`); biases and GRN parameters as (1, C). The stem (a dense conv and
# LayerNorm) and the decoder (dense V2 blocks) have the dense names and shapes already. Only the
# encoder's blocks and downsampling layers exist: the final norm and the head are trained from
# scratch when fine-tuning. Our own pre-training (models/fcmae.py) has the same names with dense
# tensors, so both read the same way.
FCMAE_DROPPED = ("decoder", "mask_token", "proj", "pred")
FCMAE_MISSING = ("norm.", "head.")  # not in the encoder; fine-tuning initialises them
_SPARSE_WRAPPED = ("ln", "linear")  # MinkowskiLayerNorm.ln, MinkowskiLinear.linear


def _dense_tensor(name: str, value: Tensor) -> tuple[str, Tensor]:
    """One tensor of the sparse encoder -> its dense name and shape (dense ones pass unchanged)."""
    parts = name.split(".")
    if parts[-1] == "kernel":
        parts[-1] = "weight"
        taps, *channels = value.shape
        size = math.isqrt(taps)
        if value.ndim == 3:  # (k*k, in, out) -> (out, in, k, k)
            value = value.permute(2, 1, 0).reshape(channels[1], channels[0], size, size).transpose(3, 2)
        else:  # depthwise (k*k, C) -> (C, 1, k, k)
            value = value.permute(1, 0).reshape(channels[0], 1, size, size).transpose(3, 2)
    elif len(parts) >= 2 and parts[-2] in _SPARSE_WRAPPED:
        del parts[-2]
    name = ".".join(parts)
    if ".grn." in name:
        value = value.reshape(1, 1, 1, -1)
    elif parts[-1] == "bias":
        value = value.reshape(-1)
    return name, value.contiguous()


def _sparse_tensor(name: str, value: Tensor) -> tuple[str, Tensor]:
    """One dense encoder tensor (names without `encoder.`) -> the sparse encoder's name and shape."""
    parts = name.split(".")
    if parts[0] == "downsample_layers" and parts[1] == "0":
        return name, value  # the stem is dense in the sparse encoder too
    if ".grn." in name:
        return name, value.reshape(1, -1)
    if parts[-1] == "weight" and value.ndim == 4:  # (out, in, k, k) -> (k*k, in, out) / (k*k, C)
        out_dim, in_dim, size, _ = value.shape
        kernel = value.transpose(2, 3).reshape(out_dim, in_dim, size * size)
        return ".".join([*parts[:-1], "kernel"]), (kernel[:, 0, :].T if ".dwconv." in name else kernel.permute(2, 1, 0))
    if parts[-2] in ("norm", "pwconv1", "pwconv2") or (parts[0] == "downsample_layers" and parts[2] == "0"):
        wrapper = "linear" if parts[-2].startswith("pwconv") else "ln"
        return ".".join([*parts[:-1], wrapper, parts[-1]]), value
    return name, value.reshape(1, -1)  # a sparse convolution's bias


def fcmae_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An FCMAE checkpoint (the official sparse release or ours) -> the V2 encoder's official names
    and shapes, decoder dropped: what fine-tuning loads."""
    out: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        if any(part in name for part in FCMAE_DROPPED):
            continue
        dense_name, dense = _dense_tensor(name.removeprefix("encoder."), value)
        out[dense_name] = dense
    return out


def fcmae_from_release(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The official `convnextv2_*_fcmae.pt` model -> `models.FCMAE`'s state dict (decoder kept)."""
    out: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        if name.startswith("encoder."):
            dense_name, value = _dense_tensor(name.removeprefix("encoder."), value)
            name = "encoder." + dense_name
        out[name] = value
    return out


def fcmae_to_release(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`models.FCMAE`'s state dict -> the official release's sparse layout (what its main_finetune.py
    and main_pretrain.py read)."""
    out: dict[str, Tensor] = {}
    for name, value in state_dict.items():
        if name.startswith("encoder."):
            sparse_name, value = _sparse_tensor(name.removeprefix("encoder."), value)
            name = "encoder." + sparse_name
        out[name] = value.contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# ResNet (torchvision's `resnet50` and timm's `resnet*`, the same names): the roadmap's first step
# --------------------------------------------------------------------------------------------------
# RoadmapNet (models/roadmap.py) names a ResNet's tensors by the role they keep along the roadmap: the
# 3x3 conv is the `dwconv` it becomes, the 1x1 convs `pwconv1`/`pwconv2` with ConvNeXt's Linear
# shape (out, in), their norms `norm1`, `norm`, `norm2`. ResNet numbers its stages layer1..layer4
# (read as `res.{i}` from 0 here, by `_resnet_stage`).
_RESNET_TO, _RESNET_FROM = _compile_rules(
    [
        ("downsample_layers.0.0.weight", "conv1.weight"),
        ("downsample_layers.0.1.{n}", "bn1.{n}"),
        ("stages.{i}.{j}.pwconv1.weight", "res.{i}.{j}.conv1.weight"),
        ("stages.{i}.{j}.norm1.{n}", "res.{i}.{j}.bn1.{n}"),
        ("stages.{i}.{j}.dwconv.weight", "res.{i}.{j}.conv2.weight"),
        ("stages.{i}.{j}.norm.{n}", "res.{i}.{j}.bn2.{n}"),
        ("stages.{i}.{j}.pwconv2.weight", "res.{i}.{j}.conv3.weight"),
        ("stages.{i}.{j}.norm2.{n}", "res.{i}.{j}.bn3.{n}"),
        ("stages.{i}.{j}.shortcut.{m}.{n}", "res.{i}.{j}.downsample.{m}.{n}"),
        ("head.{p}", "fc.{p}"),
    ]
)
_RESNET_STAGE = re.compile(r"^layer(\d+)\.")


def _resnet_stage(name: str) -> str:
    return _RESNET_STAGE.sub(lambda m: f"res.{int(m[1]) - 1}.", name, count=1)


def resnet_to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """torchvision / timm ResNet names and shapes -> RoadmapNet's (its 1x1 convs hold (out, in) matrices)."""
    converted = {}
    for name, tensor in state_dict.items():
        ours = _rename(_resnet_stage(name), _RESNET_FROM)
        converted[ours] = tensor.flatten(1) if ours.endswith((".pwconv1.weight", ".pwconv2.weight")) else tensor
    return converted


# --------------------------------------------------------------------------------------------------
# Which layout a state dict is in
# --------------------------------------------------------------------------------------------------
_HF_MARKER = re.compile(r"(convnext(v2)?\.)?(embeddings|encoder)\.")
_TIMM_MARKER = re.compile(r"stem\.\d+\.|stages\.\d+\.(blocks|downsample)\.|head\.(fc|norm)\.")
_TORCHVISION_MARKER = re.compile(r"features\.\d+\.")
_RESNET_MARKER = re.compile(r"layer\d+\.\d+\.conv1\.weight")


def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """The layout of a state dict's names: "hf", "timm", "torchvision", "fcmae", "resnet" or "official".

    Anything not recognisably timm or Hugging Face counts as official: loading it then reports exactly
    which names differ, which says more than refusing to guess.
    """
    # Before Hugging Face's: a bare HF model's names start with `encoder.` too (`encoder.stages.`).
    if any(name == "mask_token" or name.startswith("encoder.downsample_layers.") for name in state_dict):
        return "fcmae"
    if any(_HF_MARKER.match(name) for name in state_dict):
        return "hf"
    if any(_TIMM_MARKER.match(name) for name in state_dict):
        return "timm"
    if any(_TORCHVISION_MARKER.match(name) for name in state_dict):
        return "torchvision"
    if any(_RESNET_MARKER.fullmatch(name) for name in state_dict):
        return "resnet"
    return "official"


def to_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Any supported layout -> official names and shapes."""
    converters = {
        "hf": hf_to_official,
        "timm": timm_to_official,
        "torchvision": torchvision_to_official,
        "fcmae": fcmae_to_official,
        "resnet": resnet_to_official,
        "official": dict,
    }
    return converters[detect_format(state_dict)](state_dict)
