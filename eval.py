"""Score a ConvNeXt checkpoint: `python eval.py checkpoint=<file> data.root=<dir>` (model= is optional)."""

from convnext_train.cli import evaluate

if __name__ == "__main__":
    evaluate()
