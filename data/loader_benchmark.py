#!/usr/bin/env python3
"""The loader figures of BENCHMARKS.md: the FFCV path against the ImageFolder (PIL) path on the same
JPEG files, fully augmented batches as the training step receives them (the paper's recipe:
random-resized crop, flip, RandAugment rand-m9-mstd0.5-inc1, random erasing, then Mixup/CutMix), 224 px,
batch 128, each measured by `python -m convnext_train.bench loader`.

    python data/loader_benchmark.py                        # the recipe, the settings of BENCHMARKS.md
    python data/loader_benchmark.py --repeats 3 -- aug.auto_augment=null aug.color_jitter=null aug.reprob=0

--dir (default /tmp/convnext-loader-bench) receives 2,100 ImageNet-like photos (data/photo_imagefolder.py:
about 400 x 370, quality-90 JPEG) and their .beton files (data/write_ffcv.py), made once and reused.
Arguments after `--` are overrides for both paths.

Side by side in one run, but never at the same time: a loader works in the background between the
batches asked of it (worker processes, FFCV's decoding thread), so two loaders in one process would
take CPU from each other. Each bench is its own process; the paths alternate --repeats times, and each
path's figure is the median round over its runs. The machine may be shared: for each run the CPU time
that other processes used meanwhile is measured (/proc/stat minus the bench's own), and a run in which
they used more than --max-others cores is repeated (up to --retries times), never averaged in.

Both paths get the same memory settings unless --default-malloc: a glibc malloc setting, and
torch's THP_MEM_ALLOC_ENABLE=1 (torch's large CPU tensors on 2 MB transparent huge pages). Without
them every batch's large tensors (the collated or normalised batch, Mixup's flipped copy) come as
fresh 4 KB pages, about 19,000 page faults per 77 MB tensor, which took a third of the CPU time.
--torch-threads sets OMP_NUM_THREADS for both: the main process's torch operations (Mixup,
normalisation, erasing) then use that many threads; with 2, torch's spare OpenMP thread spins
between operations on a core the loader needs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MALLOC = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824"
BATCH = 128


def busy_jiffies() -> int:
    """CPU time of the whole machine so far, all cores, in clock ticks (idle and iowait excluded)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(fields) - fields[3] - fields[4]


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bench(arguments: list[str], env: dict) -> tuple[dict, float]:
    """One bench process: its JSON row, and the cores other processes used while it ran."""
    command = [sys.executable, "-m", "convnext_train.bench", "loader", *arguments]
    print("  " + " ".join(["python", *command[1:]]), flush=True)
    ticks, own, started = busy_jiffies(), children_seconds(), time.monotonic()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    others = ((busy_jiffies() - ticks) / os.sysconf("SC_CLK_TCK") - (children_seconds() - own)) / wall
    row = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    return row, others


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--dir", type=Path, default=Path("/tmp/convnext-loader-bench"))
    parser.add_argument("--ffcv-workers", type=int, default=2, help="decoding threads")
    parser.add_argument("--pil-workers", type=int, default=3, help="DataLoader worker processes")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-others", type=float, default=0.15, help="cores other processes may use during a run")
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument(
        "--torch-threads", type=int, help="OMP_NUM_THREADS for both paths (default: torch's, one per core)"
    )
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    photos, betons = args.dir / "photos", args.dir / "ffcv"
    if not (photos / "val").is_dir():
        subprocess.run(
            [
                sys.executable,
                "data/photo_imagefolder.py",
                str(photos),
                "--classes",
                "10",
                "--train-per-class",
                "200",
                "--val-per-class",
                "10",
            ],
            cwd=REPO,
            check=True,
        )
    subprocess.run(
        [sys.executable, "data/write_ffcv.py", str(photos), str(betons)],
        cwd=REPO,
        check=True,
        stderr=subprocess.DEVNULL,
    )

    env = {**os.environ, "PYTHONWARNINGS": "ignore:This DataLoader will create"}  # 3 workers on 2 cores is the point
    if not args.default_malloc:
        env["GLIBC_TUNABLES"] = MALLOC
        env["THP_MEM_ALLOC_ENABLE"] = "1"
    if args.torch_threads:
        env["OMP_NUM_THREADS"] = str(args.torch_threads)
    common = [
        f"trainer.micro_batch_size={BATCH}",
        "trainer.device=cpu",
        "data.num_classes=10",
        "warmup=3",
        "steps=10",
        "rounds=3",
        *args.overrides,
    ]
    paths = {
        "ffcv": ["data=ffcv", f"data.root={betons}", f"data.num_workers={args.ffcv_workers}", *common],
        "pil": [f"data.root={photos}", f"data.num_workers={args.pil_workers}", *common],
    }
    settings = {
        name: env.get(name, "(default)") for name in ("GLIBC_TUNABLES", "THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS")
    }
    print(f"{os.cpu_count()} cores; " + "; ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    rows: dict[str, list[dict]] = {path: [] for path in paths}
    for _repeat in range(args.repeats):
        for path, arguments in paths.items():
            for _attempt in range(args.retries + 1):
                row, others = bench(arguments, env)
                print(
                    f"  {path}: {row['images_per_sec']:.0f} images/s; other processes used {others:.2f} cores",
                    flush=True,
                )
                if others <= args.max_others:
                    rows[path].append(row)
                    break
                print(f"  (more than {args.max_others} cores used by others: run again)", flush=True)
            else:
                sys.exit("the machine stayed busy: no clean run")
    rate = {}
    for path, runs in rows.items():
        rounds = [ms for row in runs for ms in row["round_step_ms"]]
        rate[path] = BATCH / (statistics.median(rounds) / 1e3)
        each = ", ".join(f"{row['images_per_sec']:.0f}" for row in runs)
        print(f"{path:5s} {rate[path]:7.1f} images/s (median of {len(rounds)} rounds; runs: {each})")
    row = rows["ffcv"][0]
    print(
        f"ffcv / pil: {rate['ffcv'] / rate['pil']:.2f}x  ({row['device']}, python {row['python']}, torch {row['torch']}, timm {row['timm']})"
    )


if __name__ == "__main__":
    main()
