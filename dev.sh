#!/usr/bin/env bash
# The project's two entry points for a fresh machine (Debian, Python >= 3.10, git):
#   bash dev.sh demo      set up .venv (reused when present) and train the demo (extra args go to train.py)
#   bash dev.sh test      set up .venv and run the whole test suite (extra args go to pytest)
# Fast set while working:  bash dev.sh test -m "not slow"
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
stamp="$venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)"

setup() {
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
    fi
    if [[ ! -f "$stamp" ]]; then
        # torch and torchvision must come from the same registry build. Some machines point pip at a
        # local CPU-only torch wheel (find-links); torchvision has no CPU build to match it, and a CUDA
        # torchvision on a CPU torch fails at import. So resolve both from the index alone.
        PIP_FIND_LINKS= "$venv/bin/python" -m pip install -q -e ".[test]"
        rm -f "$venv"/.installed-*
        touch "$stamp"
    fi
}

cmd=${1:-}
shift || true
case "$cmd" in
    demo)
        setup
        # A ConvNeXt learns scikit-learn's handwritten digits on the CPU in about a minute.
        exec "$venv/bin/python" train.py experiment=digits "$@"
        ;;
    test)
        setup
        exec "$venv/bin/python" -m pytest "$@"
        ;;
    *)
        echo "usage: bash dev.sh demo|test [args...]" >&2
        exit 2
        ;;
esac
