"""Classify new images: `python predict.py checkpoint=<file> images=<folder or glob> [topk=5]`."""

from convnext_train.cli import predict

if __name__ == "__main__":
    predict()
