"""Classify new images: `python predict.py checkpoint=<file> images=<folder or glob> [topk=5]`."""

import hydra
from omegaconf import DictConfig

from convnext_train.errors import exit_on_user_error


@hydra.main(version_base=None, config_path="convnext_train/conf", config_name="predict")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from convnext_train.predict import run

    run(cfg)


if __name__ == "__main__":
    main()
