#!/usr/bin/env bash
# The project's two entry points for a fresh machine (Debian, Python >= 3.10, git):
#   bash dev.sh demo      set up .venv (reused when present) and train the demo (extra args go to train.py)
#   bash dev.sh test      set up .venv and run the whole test suite (extra args go to pytest)
#   bash dev.sh lint      set up .venv; ruff's lint and format check over the whole tree (CI runs it)
#   bash dev.sh fix       set up .venv; ruff fixes what it can and formats the tree
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
        rm -f "$venv"/.installed-* "$venv/ffcv-unavailable"
        touch "$stamp"
    fi
    setup_ffcv
}

# FFCV (data=ffcv, the fast data path) is the optional extra `.[ffcv]`, part of the test environment
# whenever it can be built: pip compiles it against pkg-config, libturbojpeg and OpenCV, which Debian
# ships as `pkg-config libturbojpeg0-dev libopencv-dev` (.ci/run installs them as root). Without them
# the reason is written to $venv/ffcv-unavailable and tests/test_ffcv.py skips, quoting it; FFCV
# missing without that file fails those tests instead, so a broken install cannot pass unnoticed.
setup_ffcv() {
    if "$venv/bin/python" -c "import importlib.metadata as m; m.version('ffcv')" 2>/dev/null; then
        rm -f "$venv/ffcv-unavailable"
        return
    fi
    if command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg opencv4; then
        PIP_FIND_LINKS= "$venv/bin/python" -m pip install -q -e ".[test,ffcv]"
        rm -f "$venv/ffcv-unavailable"
    else
        echo "pkg-config, libturbojpeg or OpenCV's development files are missing (Debian: apt-get install pkg-config libturbojpeg0-dev libopencv-dev)" >"$venv/ffcv-unavailable"
        echo "dev.sh: FFCV (data=ffcv) not installed: $(cat "$venv/ffcv-unavailable"); its tests will skip" >&2
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
    lint)
        setup
        "$venv/bin/ruff" check .
        exec "$venv/bin/ruff" format --check .
        ;;
    fix)
        setup
        "$venv/bin/ruff" check --fix .
        exec "$venv/bin/ruff" format .
        ;;
    *)
        echo "usage: bash dev.sh demo|test|lint|fix [args...]" >&2
        exit 2
        ;;
esac
