"""ONNX for deployment: a model written with its input contract, and run with ONNX Runtime.

The file takes a batch of preprocessed images (input `images`, (batch, 3, img_size, img_size), the
batch axis dynamic) and gives two outputs: `logits` and `embeddings` (the pooled, normalised
features the head reads: `forward_features`), so one file serves classification and retrieval. Its
metadata (ONNX `metadata_props`, strings) holds what a runtime in any language needs to prepare
images exactly as evaluation here does (`EvalPreprocessing.metadata()`: img_size, crop_pct, the
resize rule, interpolation, mean, std) and to name the classes (`class_names`, a JSON list), under
keys listed in `METADATA_KEYS`.

The graph comes from `torch.onnx.export`'s current (dynamo) exporter; ONNX Runtime is the runtime
the read-back check and predict.py's `backend=onnxruntime` use. Written here because neither
library writes or reads a model's preprocessing: that contract is ours.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convnext_train.data.transforms import EvalPreprocessing
from convnext_train.errors import UserError

INPUT = "images"
OUTPUTS = ("logits", "embeddings")
PRODUCER = "convnext_train"  # `convnext_train.producer` in the metadata marks our files
METADATA_KEYS = (
    "producer",
    "variant",
    "class_names",
    "precision",
    *EvalPreprocessing(224, 0.875).metadata(),  # its keys: the same for any size
)


class _LogitsAndEmbeddings(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeddings = self.model.forward_features(images)
        return self.model.head(embeddings), embeddings


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    preprocessing: EvalPreprocessing,
    class_names: list[str],
    variant: str,
    precision: str = "fp32",
    opset: int | None = None,
) -> None:
    """Write `model` (left unchanged) to `path` as ONNX; `precision="fp16"` stores weights and takes
    images in half precision (for GPU runtimes: half the file, faster tensor cores). A model over
    protobuf's 2 GiB limit gets its weights in `<path>.data` beside it."""
    _require("onnxscript", "format=onnx")  # what torch.onnx's exporter writes the graph with
    dtype = {"fp32": torch.float32, "fp16": torch.float16}[precision]
    module = _LogitsAndEmbeddings(copy.deepcopy(model).to(dtype)).eval()
    example = torch.zeros(2, 3, preprocessing.img_size, preprocessing.img_size, dtype=dtype)
    with quiet("onnx_ir", "onnxscript", "torch.onnx"):  # their INFO records are a page per export
        program = torch.onnx.export(
            module,
            (example,),
            dynamo=True,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            opset_version=opset,
            verbose=False,
        )
    metadata = {
        "producer": PRODUCER,
        "variant": variant,
        "class_names": json.dumps(class_names),
        "precision": precision,
        **preprocessing.metadata(),
    }
    program.model.metadata_props.update({f"{PRODUCER}.{key}": value for key, value in metadata.items()})
    program.save(str(path))


@contextlib.contextmanager
def quiet(*loggers: str):
    """These loggers' records below WARNING dropped for a while (libraries' INFO chatter)."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


@dataclass
class OnnxModel:
    """An ONNX file of ours in an ONNX Runtime session, with what its metadata says."""

    session: object  # onnxruntime.InferenceSession
    variant: str
    class_names: list[str]
    preprocessing: EvalPreprocessing
    precision: str

    @classmethod
    def load(cls, path: str | os.PathLike, *, threads: int | None = None, device: str = "auto") -> OnnxModel:
        """One line, naming the fix, for a file that is not ONNX or not ours (no metadata). `device`:
        cpu, or auto / cuda for CUDA's provider when this onnxruntime has it (onnxruntime-gpu)."""
        onnxruntime = _require("onnxruntime", "backend=onnxruntime")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=_providers(onnxruntime, device))
        except Exception as error:  # ORT raises its own exception types, one per failure
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(
                f"ONNX Runtime cannot read {path} ({first_line}): it takes the .onnx file that "
                "`python -m convnext_train.export format=onnx` writes"
            ) from None
        stored = session.get_modelmeta().custom_metadata_map
        ours = {key.removeprefix(f"{PRODUCER}."): value for key, value in stored.items() if key.startswith(PRODUCER)}
        missing = [key for key in METADATA_KEYS if key not in ours]
        if missing:
            raise UserError(
                f"{path} has no convnext_train metadata ({', '.join(missing)} missing): predict.py needs its "
                "preprocessing and class names; export the model with `python -m convnext_train.export "
                "checkpoint=<file> format=onnx out=<file.onnx>`"
            )
        try:
            preprocessing = EvalPreprocessing.from_metadata(ours)
            class_names = json.loads(ours["class_names"])
        except (KeyError, ValueError) as error:
            raise UserError(f"{path}: malformed convnext_train metadata ({error}); export the model again") from None
        outputs = [output.name for output in session.get_outputs()]
        if [i.name for i in session.get_inputs()] != [INPUT] or outputs[: len(OUTPUTS)] != list(OUTPUTS):
            raise UserError(f"{path}: expected input {INPUT!r} and outputs {list(OUTPUTS)}; export the model again")
        return cls(session, ours["variant"], class_names, preprocessing, ours["precision"])

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, embeddings) in float32 for a batch of preprocessed images (any float dtype)."""
        dtype = np.float16 if self.precision == "fp16" else np.float32
        logits, embeddings = self.session.run(list(OUTPUTS), {INPUT: images.numpy().astype(dtype, copy=False)})
        return torch.from_numpy(logits).float(), torch.from_numpy(embeddings).float()


def _providers(onnxruntime, device: str) -> list[str]:
    """CUDA first when asked for and this onnxruntime build has it (onnxruntime-gpu), else the CPU."""
    wanted = ("CPUExecutionProvider",) if device == "cpu" else ("CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in onnxruntime.get_available_providers()]


def _require(package: str, what: str):
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(
            f"{what} needs the {package} package: pip install 'convnext-train[onnx]' (onnx, onnxscript, onnxruntime)"
        ) from None


def is_onnx(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == ".onnx"
