#!/usr/bin/env bash
# The project's two entry points for a fresh machine (Debian, Python >= 3.10, git):
#   bash dev.sh demo      set up .venv (reused when present) and train the demo (extra args go to train.py)
#   bash dev.sh test      set up .venv and run the whole test suite (extra args go to pytest)
#   bash dev.sh lint      set up .venv; ruff's lint and format check over the whole tree (CI runs it)
#   bash dev.sh fix       set up .venv; ruff fixes what it can and formats the tree
#   bash dev.sh lock      re-resolve every dependency (all extras) in a scratch venv and rewrite
#                         requirements.lock; then run `bash dev.sh test` and commit both if it passes
# .venv installs the exact versions in requirements.lock (the ones the suite last passed with), so the
# README's figures and the bitwise-resume tests are tied to versions; pyproject.toml keeps the ranges
# for users who bring their own torch (pip install -e . ignores the lock).
# Fast set while working:  bash dev.sh test -m "not slow"
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
lock=requirements.lock
stamp="$venv/.installed-$(cat pyproject.toml "$lock" | sha1sum | cut -c1-12)"

setup() {
    if [[ ! -x "$venv/bin/python" ]]; then
        python3 -m venv "$venv"
    fi
    if [[ ! -f "$stamp" ]]; then
        # torch and torchvision must come from the same registry build. Some machines point pip at a
        # local CPU-only torch wheel (find-links); torchvision has no CPU build to match it, and a CUDA
        # torchvision on a CPU torch fails at import. So resolve both from the index alone.
        PIP_FIND_LINKS= "$venv/bin/python" -m pip install -q -c "$lock" -e ".[test]"
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
        PIP_FIND_LINKS= "$venv/bin/python" -m pip install -q -c "$lock" -e ".[test,ffcv]"
        rm -f "$venv/ffcv-unavailable"
    else
        echo "pkg-config, libturbojpeg or OpenCV's development files are missing (Debian: apt-get install pkg-config libturbojpeg0-dev libopencv-dev)" >"$venv/ffcv-unavailable"
        echo "dev.sh: FFCV (data=ffcv) not installed: $(cat "$venv/ffcv-unavailable"); its tests will skip" >&2
    fi
}

# A fresh resolve of every extra, written as pip constraints. The scratch venv is deleted afterwards;
# torch's CUDA build makes this a download of several GB unless pip finds it on the local disk.
write_lock() {
    local scratch
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' RETURN
    python3 -m venv "$scratch/venv"
    local extras=test,hf,wds,slurm,robustness,onnx
    if command -v pkg-config >/dev/null && pkg-config --exists libturbojpeg opencv4; then
        extras=$extras,ffcv
    else
        echo "dev.sh lock: FFCV's build dependencies are missing (see setup_ffcv); its pins are kept from the old lock" >&2
    fi
    PIP_FIND_LINKS= "$scratch/venv/bin/python" -m pip install -q -e ".[$extras]"
    {
        echo "# Exact versions the test suite passed with; dev.sh installs them as pip constraints."
        echo "# Refresh: bash dev.sh lock, then bash dev.sh test, then commit. Ranges live in pyproject.toml."
        echo "# Resolved $(date -u +%Y-%m-%d) for Python $("$scratch/venv/bin/python" -c 'import platform; print(platform.python_version())') on $(uname -m)."
        # --all: torch needs setuptools at run time. Local version labels (+cu130) name a build, not a
        # release: pip matches ==X against X+label.
        "$scratch/venv/bin/python" -m pip freeze --all --exclude-editable | grep -v "^pip==" | sed -E 's/\+[A-Za-z0-9.]+$//'
        if [[ $extras != *ffcv* ]]; then grep -i '^ffcv==' "$lock" || true; fi
    } >"$lock.tmp"
    mv "$lock.tmp" "$lock"
    echo "dev.sh lock: wrote $lock ($(grep -vc '^#' "$lock") pins); now run bash dev.sh test"
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
    lock)
        write_lock
        ;;
    fix)
        setup
        "$venv/bin/ruff" check --fix .
        exec "$venv/bin/ruff" format .
        ;;
    *)
        echo "usage: bash dev.sh demo|test|lint|fix|lock [args...]" >&2
        exit 2
        ;;
esac
