"""python -m convnext_train.gpu_suite <out dir> [--quick] [--only ...] [--budget-minutes N] [--continue-from FILE]"""

import os
import sys

from convnext_train.gpu_suite.cli import main

if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # train.py's runs inherit it: their logs arrive as they go
    sys.exit(main(sys.argv[1:]))
