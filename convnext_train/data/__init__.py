"""Input pipeline. The trainer's seam is `datasets` (`build_loaders`: ImageFolder, FFCV, Hugging Face
datasets, WebDataset shards or synthetic data, by `data.kind`). ImageFolder path: `imagefolder`
(datasets with clear errors), `transforms` (timm's transforms and Mixup/CutMix), `loaders` (per-sample
seeded order and workers). FFCV path: `ffcv` (the .beton reader, decoder and crop), `rand_augment`
(timm's RandAugment compiled per image), `batch_augment` (normalisation and random erasing per batch),
`compiled` (numba helpers). `hf`: a Hugging Face `datasets` split read as ImageFolder-like images under
the same loaders. `wds` and `wds_shards`: WebDataset tar shards streamed per rank and worker. Also
`synthetic` (random images, for benchmarks) and `digits` (the bundled demo dataset)."""
