"""Train a ConvNeXt: `python train.py model=convnext_t data.root=/datasets/imagenet`."""

import hydra
from omegaconf import DictConfig

from convnext_train.errors import exit_on_user_error


@hydra.main(version_base=None, config_path="conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from convnext_train.trainer import run

    run(cfg)


if __name__ == "__main__":
    main()
