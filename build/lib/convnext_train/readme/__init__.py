"""README sections written by code (the variant and recipe tables): tests check they are current.

A section sits between `<!-- NAME:start -->` and `<!-- NAME:end -->`; `table_command` gives a table
module its command line: print the table, or `--update README.md` to rewrite the section.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path


def update_section(path: Path, start: str, end: str, body: str) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path} has no {start} ... {end} section to update")
    # A function, not a template string: the table's own backslashes must stay as they are.
    path.write_text(pattern.sub(lambda _: f"{start}\n{body}\n{end}", text))


def table_command(description: str, start: str, end: str, make_table: Callable[[], str]) -> None:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--update", type=Path, metavar="README", help="rewrite the table's section of this file")
    args = parser.parse_args()
    if args.update:
        update_section(args.update, start, end, make_table())
    else:
        print(make_table())
