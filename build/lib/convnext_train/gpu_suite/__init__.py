"""The GPU suite: everything GPU-only proved and measured by one command, inside a short loan.

    python -m convnext_train.gpu_suite <out dir>                 # on the GPU: about 8 minutes
    python -m convnext_train.gpu_suite <out dir> --quick         # anywhere: tiny model, nothing timed
    python -m convnext_train.gpu_suite <out dir> --only throughput --budget-minutes 6

Writes `<out>/suite.jsonl` (one JSON line per item, as each ends, so a run cut short keeps what it
did) and `<out>/report.md` (rewritten after each item; its tables paste into BENCHMARKS.md).

1. correctness: the device's training step and logits against the CPU's fp32 ones
   (`checks`), the batch augmentations on the device, a `train.py data=synthetic` run killed
   and resumed against an uninterrupted one, and the repository's CUDA-only tests (`-m cuda`).
2. throughput: ours against timm's build in the same loop, interleaved (`measure.measure`):
   training steps of T/S/B at 224 (bf16, channels-last, eager and compiled) with MFU, inference of
   T/S/B/L (the paper's Table 12: TF32 and bf16), peak memory, and the largest micro-batch that
   fits for T/B/L.
3. gpu_hours: 300 ImageNet-1K epochs per variant from the measured training rates.

The loan is short (about 15 minutes with the machine's start), so the items run in order of what
matters most, under a time budget: before each one the suite estimates its cost from the slowest
item of its kind so far (a first guess before that) and skips it, saying so, when it would not fit.
A failing item is recorded and the suite goes on; the exit status is 1 when any check failed.

`--quick` runs the same items with ConvNeXt-atto at 32 px, a few steps, everything eager (inductor's
CPU compile would take minutes of CI for a flag that is the same code path): CI runs it.
"""
