"""The run directory's `.hydra/` copy of the command that runs there, written only under the run's lock.

Hydra writes `<run_dir>/.hydra/{config,hydra,overrides}.yaml` itself before the task function starts,
so a second job started in a directory that is in use would replace the running job's copy with its
own command (another `trainer.log_every`, say: keys the directory's name leaves out) even though the
lock then refuses it. conf/train.yaml turns Hydra's copy off (`hydra.output_subdir: null`) and the
trainer writes the same three files, as Hydra does (`OmegaConf.to_yaml`, interpolations kept), once
the Checkpointer holds the lock and has accepted the recipe: the copy always describes the job that
runs, or last ran, in the directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from convnext_train.atomic import write_text_atomically

SUBDIR = ".hydra"  # Hydra's default output_subdir: where users and tools look for it


@dataclass(frozen=True)
class CommandRecord:
    config: str  # the job's config, without the `hydra` node
    hydra: str  # the `hydra` node: run directory, choices, runtime
    overrides: str  # the command line's overrides of the job's config

    @classmethod
    def capture(cls, cfg: DictConfig) -> CommandRecord:
        """The texts as Hydra would have written them. Taken at the start, before validation resolves
        `cfg` in place (Hydra's copy keeps the interpolations)."""
        hydra = HydraConfig.instance().cfg  # {"hydra": ...}: the node Hydra saves as hydra.yaml
        return cls(
            config=OmegaConf.to_yaml(cfg),
            hydra=OmegaConf.to_yaml(hydra),
            overrides=OmegaConf.to_yaml(hydra.hydra.overrides.task),
        )

    def write(self, run_dir: Path) -> None:
        """Only by the job that holds the run directory's lock (rank 0): each file whole, replacing the
        previous job's (a resume records the command that resumed)."""
        for name in ("config", "hydra", "overrides"):
            write_text_atomically(Path(run_dir) / SUBDIR / f"{name}.yaml", getattr(self, name))
