"""Input pipeline. The seam is `sources`: one registry keyed by `data.kind`, each source one module
with its loaders, its config checks and its root hint: `imagefolder` (ImageFolder trees, with clear
errors), `digits` (the bundled demo, written as such a tree), `synthetic` (random images, for
benchmarks), `hf` (a Hugging Face `datasets` split read as ImageFolder-like images), `wds` (+
`wds_shards`: WebDataset tar shards streamed per rank and worker), `ffcv/` (the fast path: .beton
reader, compiled decoder and crop) and `robustness` (the evaluation sets). Shared by them:
`loaders` (per-sample seeded order and workers), `transforms` (timm's transforms and Mixup/CutMix),
`rand_augment` (timm's RandAugment compiled per image), `batch_augment` (normalisation and random
erasing per batch), `compiled` (numba helpers)."""
