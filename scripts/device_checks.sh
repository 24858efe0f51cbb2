#!/usr/bin/env bash
# The device checks of issues 13, 15 and 16 as one prepared run for a lent device machine (15 minutes of
# device time in all: this script is sized to finish in about 10 on an H100/H200).
#
#   bash scripts/device_checks.sh            # on the device machine, from the repository root
#   DEVICE=cpu QUICK=1 bash scripts/device_checks.sh   # a dry run of the same steps, tiny budgets
#
# The data travels with the tree: copy the MNIST and Fashion-MNIST files into an ignored folder
# first (`mkdir -p .devdata && cp -r ../shared/data/{mnist,fashion-mnist} .devdata/`, with `.devdata/`
# in .git/info/exclude) and name `.devdata` in the run's carry. Results go to $OUT (or ./out): the
# device tool brings back at most 8 files, so every step's output is appended to $OUT/log.txt, a
# summary (exit code and seconds per step) to $OUT/summary.txt, and the JSON curves and TensorBoard
# runs are packed into $OUT/results.tgz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
export AMSTREAM_DATA="${AMSTREAM_DATA:-.devdata}" PYTHONPATH=".:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
DEVICE="${DEVICE:-cuda}"
PY="${PY:-python3}"
# QUICK: a dry run of every step on a CPU in about 10 minutes (narrow networks stand for the wide ones)
if [ -n "${QUICK:-}" ]; then
    R=2; S=2; IT=2; DS=5; SR=1; EP="--max-samples 2000"; WIDE="--hidden 256,256 --batch-size 256 --warmup 1"; FULL="--hidden 100,100"
    PROCS=1,2
else
    R=20; S=10; IT=200; DS=50; SR=7; EP=""; WIDE="--hidden 4096,4096 --batch-size 2048"; FULL=""; PROCS=1,2,4,8
fi

step() {  # step NAME COMMAND...: run, keep the output, never stop the script
    local name=$1 start=$SECONDS status
    shift
    echo "== $name: $*" >>"$OUT/log.txt"
    "$@" >>"$OUT/log.txt" 2>&1
    status=$?
    echo "$name: exit $status, $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

nvidia-smi >>"$OUT/log.txt" 2>&1 || true
# 1. tests under the GPU marker: captured (compiled) steps equal eager ones, the conformance suite on CUDA
step gpu-tests $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_compiled.py tests/test_conformance.py \
    tests/test_agents.py
# 2. issue 15: step ratios eager and compiled, batch 200 and 1; the wide network at batch 2048
step steps-b200 $PY scripts/bench.py --device "$DEVICE" --section steps --section compiled \
    --learner am-adam,am-mem --rounds $R --steps $S
step steps-b1 $PY scripts/bench.py --device "$DEVICE" --section steps --section compiled \
    --learner am-adam --batch-size 1 --rounds $R --steps $S
step steps-4096 $PY scripts/bench.py --device "$DEVICE" --section steps --section compiled \
    --learner am-adam --also none $WIDE --rounds $R --steps $S
# AM-mem's first-layer parts against the exact solve, and its memory update as one GEMM or as row panels
step solve-parts $PY scripts/bench.py --device "$DEVICE" --section solve --solve-rounds $SR --solve-repeats 3
# issue 16: data-parallel throughput on the machine's CPU cores, 1-8 gloo processes of one thread each
step distributed-cpu $PY scripts/bench.py --section distributed --processes $PROCS --distributed-steps $DS \
    --distributed-learner backprop,am-adam,am-mem,locoprop-m --distributed-overlap
# 3. issue 15: one MNIST epoch of the section 1 protocol, eager and compiled (time and accuracy), with
# BatchNorm (the protocol) and without; compiled, both steps are one CUDA graph each
for mode in false true; do
    for bn in --batchnorm ""; do
        step "epoch-compile-$mode${bn:+-bn}" $PY scripts/stream.py --dataset mnist --learner am-adam --batch-size 200 \
            --epochs 1 $bn --device "$DEVICE" --compile $mode --quiet --logdir "$WORK/runs" $EP
    done
done
# 4. issue 15: the other learners' compiled steps (after the issues' own lines: the least needed last)
step compiled-locoprop-fw $PY scripts/bench.py --device "$DEVICE" --section compiled \
    --learner locoprop-s,locoprop-m,frank-wolfe --rounds $R --steps $S
step compiled-admm $PY scripts/bench.py --device "$DEVICE" --section compiled --learner admm-softmax,dladmm \
    --rounds $R --steps $S
# 5. issue 13: dlADMM's reference protocol at 784-1000-1000-10 (backtracking and bound), both data sets
for ds in mnist fashion-mnist; do
    for run in "dladmm:preset=reference" "dladmm:preset=reference,step_size=bound" "gd:lr=0.1" "adam:lr=1e-3"; do
        name="full-$ds-$(echo "$run" | tr ':=,' '---')"
        step "$name" $PY scripts/full_batch.py --dataset $ds --run "$run" --iterations $IT $FULL --device "$DEVICE" \
            --json "$WORK/$name.json"
    done
done
tar czf "$OUT/results.tgz" -C "$WORK" . 2>/dev/null
echo "done: $OUT/summary.txt, $OUT/log.txt, $OUT/results.tgz"
