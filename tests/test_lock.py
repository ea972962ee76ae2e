"""requirements.lock against pyproject.toml and against the environment the suite runs in.

dev.sh installs the lock as pip constraints; CI builds a fresh .venv that way and runs these, so a
range changed in pyproject.toml without `bash dev.sh lock`, or a new dependency the lock does not
pin, fails here rather than silently resolving whatever the registry serves that day.
"""

from __future__ import annotations

import importlib.metadata as metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest brings tomli
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
EXTRAS = ("test", "hf", "wds", "slurm", "robustness", "onnx", "ffcv")


def locked() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"requirements.lock: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = Version(version)
    return pins


def declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(text) for text in project["dependencies"]]
    for extra, texts in project["optional-dependencies"].items():
        assert extra in EXTRAS, f"pyproject.toml: extra {extra!r} is new; add it to EXTRAS here and to dev.sh lock"
        requirements += [Requirement(text) for text in texts]
    return requirements


def test_every_declared_dependency_is_pinned_inside_its_range():
    pins = locked()
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is in pyproject.toml but not in requirements.lock: bash dev.sh lock"
        # A local build label (+cu130) is not part of the pin; ranges never name one.
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {requirement.name}=={pins[name]}, outside pyproject.toml's "
            f"{requirement.specifier}: bash dev.sh lock"
        )


def _closure() -> dict[str, str]:
    """Installed version of every distribution the project needs with all its extras, transitively
    (markers evaluated for this interpreter and platform); distributions not installed are left out
    (FFCV where its build dependencies are missing)."""
    seen: dict[str, str] = {}
    pending = [(Requirement(f"convnext-train[{','.join(EXTRAS)}]"), None)]
    while pending:
        requirement, parent_extra = pending.pop()
        if requirement.marker is not None:
            environment = {**default_environment(), "extra": parent_extra or ""}
            if not requirement.marker.evaluate(environment):
                continue
        name = canonicalize_name(requirement.name)
        try:
            distribution = metadata.distribution(requirement.name)
        except metadata.PackageNotFoundError:
            continue
        if name in seen and not requirement.extras:
            continue
        seen[name] = distribution.version
        for text in distribution.requires or []:
            child = Requirement(text)
            # A child guarded by `extra == "x"` is needed only when x was asked for.
            for extra in requirement.extras or {None}:
                pending.append((child, extra))
    seen.pop("convnext-train")
    return seen


def test_the_environment_running_the_suite_is_the_locked_one():
    pins = locked()
    installed = _closure()
    for core in ("torch", "torchvision", "timm", "numpy", "hydra-core"):
        assert core in installed, f"{core} is not installed"
    unpinned = sorted(set(installed) - set(pins))
    assert not unpinned, f"installed but not in requirements.lock: {', '.join(unpinned)}; run bash dev.sh lock"
    different = [
        f"{name} {version} (lock: {pins[name]})"
        for name, version in sorted(installed.items())
        if Version(Version(version).public) != pins[name]
    ]
    assert not different, f"not the locked versions: {'; '.join(different)}; bash dev.sh sets up .venv from the lock"
