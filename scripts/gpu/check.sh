#!/usr/bin/env bash
# `make gpu-check`, on a machine with a CUDA device:
#   scripts/gpu/check.sh PYTHON [--carry DIR] [STEP ...]
# STEPs (default all three): `tests` (the tests marked gpu), `bench` (bench/gpu.py), `reproduce`
# (every seed experiment on the GPU, timed). Figures and logs go to $FIGURES (gpu-figures/).
# --carry DIR: a folder made by scripts/gpu/carry.py on a machine with network: its wheels are
# installed offline (pip --no-index) into DIR/site and its datasets are used.
# $REPRODUCE_ARGS: more `mlplab reproduce` arguments (`--only mnist mnist_1v7` where only MNIST
# was carried). Every step runs even when an earlier one fails; the exit status is 1 if any did.
set -euo pipefail
trap 'exit 130' INT TERM  # Ctrl-C stops every step, not just the one running
cd "$(dirname "$0")/../.."
python=${1:?usage: scripts/gpu/check.sh PYTHON [--carry DIR] [tests|bench|reproduce ...]}
shift
carry=
if [ "${1:-}" = --carry ]; then carry=$(cd "${2:?--carry needs a folder}" && pwd); shift 2; fi
steps=${*:-tests bench reproduce}
for step in $steps; do
    case $step in tests | bench | reproduce) ;; *)
        echo "scripts/gpu/check.sh: error: unknown step $step (tests, bench, reproduce)" >&2
        exit 2 ;;
    esac
done
figures=${FIGURES:-gpu-figures}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$carry" ]; then
    rm -rf "$carry/site"  # the wheels carried this time, no older ones
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$carry/site" \
        "$carry"/wheels/*.whl
    export PYTHONPATH="$carry/site:$PYTHONPATH"
    # --no-deps: say where a wheel wants another version of what the machine ships
    "$python" -m pip check >&2 || echo "scripts/gpu/check.sh: warning: pip check (above)" >&2
    if [ -d "$carry/datasets" ]; then export MLPLAB_DATA_DIR="$carry/datasets"; fi
fi
"$python" -c 'import sys, torch; torch.cuda.is_available() or sys.exit("scripts/gpu/check.sh: error: no CUDA device here")'
mkdir -p "$figures"
status=0
for step in $steps; do
    case $step in
        tests) "$python" -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 |
            tee "$figures/tests.txt" || status=1 ;;
        bench) "$python" bench/gpu.py --out "$figures/bench.md" || status=1
            "$python" bench/stacked.py --only mnist --trials 64 --accelerator gpu |
                tee "$figures/stacked.txt" || status=1 ;;
        reproduce)
            # shellcheck disable=SC2086  # the extra arguments split as words
            "$python" -m mlplab reproduce --experiments my_project.experiments --output "$figures/RESULTS.md" ${REPRODUCE_ARGS:-} \
                --trainer.accelerator gpu --data.on_device true || status=1 ;;
    esac
done
echo "scripts/gpu/check.sh: $steps: $([ $status = 0 ] && echo passed || echo FAILED); figures in $figures/"
exit $status
