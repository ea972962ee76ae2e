"""Score a ConvNeXt checkpoint: `python eval.py checkpoint=<file> data.root=<dir>` (model= is optional)."""

import hydra
from omegaconf import DictConfig

from convnext_train.errors import exit_on_user_error


@hydra.main(version_base=None, config_path="convnext_train/conf", config_name="eval")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from convnext_train.evaluate import run

    run(cfg)


if __name__ == "__main__":
    main()
