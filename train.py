"""Train a ConvNeXt: `python train.py model=convnext_t data.root=/datasets/imagenet`."""

# First, before the slow imports: a stop signal (SLURM's SIGUSR1/SIGTERM) during start-up is
# recorded and honoured before the first step, instead of killing the job (convnext_train/preemption.py).
from convnext_train import preemption

preemption.install()

from convnext_train.cli import train  # noqa: E402

if __name__ == "__main__":
    train()
