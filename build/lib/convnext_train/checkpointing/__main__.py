"""python -m convnext_train.checkpointing consolidate <sharded checkpoint directory> <file.pt>"""

from __future__ import annotations

import argparse
from pathlib import Path

from convnext_train.checkpointing import consolidate
from convnext_train.errors import exit_on_user_error


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m convnext_train.checkpointing")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser(
        "consolidate", help="a sharded (DCP) checkpoint directory -> one full checkpoint file, in one process"
    )
    merge.add_argument("source", type=Path, help="e.g. outputs/train/<run>/checkpoints/step_000001234 (or .../last)")
    merge.add_argument("target", type=Path, help="the .pt file to write (atomically)")
    args = parser.parse_args(argv)
    consolidate(args.source, args.target)
    print(f"wrote {args.target} from {args.source}")


if __name__ == "__main__":
    main()
