"""The variant table of the README: parameters and GMACs computed from `conf/model`, the papers'
top-1 beside them.

    python -m convnext_train.readme.models                 # print it (Markdown)
    python -m convnext_train.readme.models --update README.md
"""

from __future__ import annotations

import torch

from convnext_train import configs
from convnext_train.models import build_model
from convnext_train.models.complexity import count_gmacs, count_params
from convnext_train.readme import table_command

# ImageNet-1K top-1 (%) at 224 px as the papers report it. V1: "A ConvNet for the 2020s", Tables 1
# and 2 (trained on IN-1K from scratch; XL was only trained with IN-22K). V2: "ConvNeXt V2", the
# FCMAE pre-trained, IN-1K fine-tuned models of its results table. The atto..nano V1 sizes are
# timm's, not the paper's.
PAPER_TOP1 = {
    "convnext_t": 82.1,
    "convnext_s": 83.1,
    "convnext_b": 83.8,
    "convnext_l": 84.3,
    "convnext_iso_s": 78.7,
    "convnext_iso_b": 82.0,
    "convnext_iso_l": 82.6,
    "convnextv2_atto": 76.7,
    "convnextv2_femto": 78.5,
    "convnextv2_pico": 80.3,
    "convnextv2_nano": 81.9,
    "convnextv2_t": 83.0,
    "convnextv2_b": 84.9,
    "convnextv2_l": 85.8,
    "convnextv2_h": 86.3,
}
# The paper reports 384 px figures for these.
HIGH_RES = {"convnext_b", "convnext_l", "convnext_xl"}
START, END = "<!-- variant-table:start -->", "<!-- variant-table:end -->"


def variants() -> list[tuple[str, torch.nn.Module]]:
    """(name, weightless model) for every config, by family, then by size."""
    families = {"convnext": 0, "convnext_iso": 1, "convnextv2": 2}
    models = [(name, _meta_model(name)) for name in configs.options("model")]
    return sorted(models, key=lambda item: (families[item[0].rsplit("_", 1)[0]], count_params(item[1])))


def _meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return build_model(configs.load("model", name))


def markdown_table() -> str:
    lines = [
        "| model | params (M) | GMACs @224 | GMACs @384 | paper top-1 @224 (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, model in variants():
        gmacs384 = f"{count_gmacs(model, 384):.1f}" if name in HIGH_RES else ""
        top1 = f"{PAPER_TOP1[name]:.1f}" if name in PAPER_TOP1 else "–"
        lines.append(
            f"| `{name}` | {count_params(model) / 1e6:.1f} | {count_gmacs(model, 224):.2f} | {gmacs384} | {top1} |"
        )
    return "\n".join(lines)


def main() -> None:
    table_command(__doc__, START, END, markdown_table)


if __name__ == "__main__":
    main()
