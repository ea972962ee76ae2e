"""Train a ConvNeXt: `python train.py model=convnext_t data.root=/datasets/imagenet`."""

# First, before the slow imports: a stop signal (SLURM's SIGUSR1/SIGTERM) during start-up is
# recorded and honoured before the first step, instead of killing the job (convnext_train/preemption.py).
from convnext_train import preemption

preemption.install()

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from convnext_train.errors import exit_on_user_error  # noqa: E402


@hydra.main(version_base=None, config_path="convnext_train/conf", config_name="train")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from convnext_train.trainer import run

    run(cfg)


if __name__ == "__main__":
    main()
