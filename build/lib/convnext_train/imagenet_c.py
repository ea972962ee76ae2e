"""ImageNet-C's summary numbers: mCE and relative mCE, normalised by AlexNet's published errors.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (arXiv:1903.12261), section 3: for a classifier f with top-1 error
E_{s,c} on corruption c at severity s,

    CE_c          = sum_s E_{s,c} / sum_s E^AlexNet_{s,c}
    relative CE_c = sum_s (E_{s,c} - E_clean) / sum_s (E^AlexNet_{s,c} - E^AlexNet_clean)

and mCE / relative mCE are their means over the 15 corruptions, in percent (AlexNet scores 100).
The AlexNet errors below are the paper's baseline per corruption and severity, as the authors
published them (they are also timm's `imagenetc_alexnet_error_rates_list`); their means per
corruption are the paper's AlexNet CE row (0.886428 for Gaussian noise, ...). AlexNet's clean
error is that of the torchvision AlexNet the authors scored (their ImageNet-C/test.py loads
`alexnet-owt-4df8aa71.pth`): top-1 accuracy 56.522% in torchvision's weight metadata, so an error
of 43.478% (the paper prints 43.5%).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from convnext_train.data.robustness import CORRUPTIONS, SEVERITIES

ALEXNET_CLEAN_ERROR = 1 - 0.56522
ALEXNET_ERRORS: dict[str, tuple[float, float, float, float, float]] = {
    "gaussian_noise": (0.69528, 0.82542, 0.93554, 0.98138, 0.99452),
    "shot_noise": (0.71224, 0.85108, 0.93574, 0.98182, 0.99146),
    "impulse_noise": (0.78374, 0.89808, 0.9487, 0.9872, 0.99548),
    "defocus_blur": (0.65624, 0.73202, 0.85036, 0.91364, 0.94714),
    "glass_blur": (0.64308, 0.75054, 0.88806, 0.91622, 0.93344),
    "motion_blur": (0.5843, 0.70048, 0.82108, 0.8975, 0.92638),
    "zoom_blur": (0.70008, 0.76992, 0.80784, 0.84198, 0.87198),
    "snow": (0.71726, 0.88392, 0.86468, 0.9187, 0.94952),
    "frost": (0.6139, 0.79734, 0.8879, 0.89942, 0.9343),
    "fog": (0.67474, 0.7605, 0.84378, 0.8726, 0.945),
    "brightness": (0.4514, 0.48502, 0.54048, 0.62166, 0.7244),
    "contrast": (0.64548, 0.7615, 0.88874, 0.9776, 0.9927),
    "elastic_transform": (0.52596, 0.70116, 0.55686, 0.64076, 0.80554),
    "pixelate": (0.52218, 0.5462, 0.73728, 0.87092, 0.91262),
    "jpeg_compression": (0.51002, 0.54718, 0.57294, 0.65458, 0.74778),
}


def corruption_errors(errors: Mapping[str, Sequence[float]], clean_error: float | None) -> dict:
    """CE and relative CE per corruption, and mCE / relative mCE, in percent.

    `errors[c]`: the top-1 errors (fractions) at severities 1..5 of each corruption scored; a
    corruption needs all five. mCE needs all 15 corruptions: with some missing it is None (a
    partial mean would not be comparable with published numbers). Relative (m)CE needs the clean
    error (fraction) of the same model; None without it.
    """
    per_corruption = {}
    for name, values in errors.items():
        if name not in ALEXNET_ERRORS or len(values) != len(SEVERITIES):
            raise ValueError(f"{name}: need the errors at severities {SEVERITIES}, got {list(values)}")
        alexnet = ALEXNET_ERRORS[name]
        entry = {"errors": [100.0 * e for e in values], "ce": 100.0 * sum(values) / sum(alexnet)}
        if clean_error is not None:
            entry["relative_ce"] = (
                100.0 * sum(e - clean_error for e in values) / sum(a - ALEXNET_CLEAN_ERROR for a in alexnet)
            )
        per_corruption[name] = entry
    complete = all(name in per_corruption for name in CORRUPTIONS)
    mce = sum(per_corruption[n]["ce"] for n in CORRUPTIONS) / len(CORRUPTIONS) if complete else None
    relative = None
    if complete and clean_error is not None:
        relative = sum(per_corruption[n]["relative_ce"] for n in CORRUPTIONS) / len(CORRUPTIONS)
    return {"mce": mce, "relative_mce": relative, "corruptions": per_corruption}
