#!/usr/bin/env bash
# Every GPU number of the performance issue (30) in one run of at most 5 minutes, each step's output
# in $OUT/<step>.txt and $OUT/summary.md putting each number beside its goal (bench/NOTES.md §14):
#
#   versions      nvidia-smi, python, torch, CUDA, cuDNN, GPU, timm, triton
#   pair_b256     bench/pair_step.py, 224 px, batch 256: resnet18, regnetx_016 (their distillation batch)
#   pair_b64      bench/pair_step.py, 224 px, batch 64, all three (the pair batch; MobileNetV4's
#                 distillation batch), --profile: each pair step's GPU kernel time over its wall time
#   mckp          bench/mckp.py: the knapsack per batch of 64 and 256 (N = 77, K = 8, C = 424 among them)
#   projection    bench/projection.py on config/paper.yaml: the paper profile's device-hours
#   train         config/smoke.yaml's teacher and W trained on $DEVICE by the DAG's own job scripts
#                 (workflow/scripts/teacher.py, distill.py: dptq.train, no snakemake needed)
#   equivalence   bench/pair_equivalence.py --device $DEVICE: the fast step (bf16 on CUDA) against the
#                 straightforward one on the CPU
#
# A failing or timed-out step is recorded and the next one runs; the steps share a budget of
# BUDGET_S seconds (default 285), each also capped on its own.
#
# On the device machine (python3 there has torch, timm, triton, but not jsonschema, which
# dptq.config needs): prepare the wheels here once, from the repository's root,
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
# (attrs and typing-extensions, their other needs, are there) and run it with the device tool:
#   run(command="bash bench/gpu.sh", carry=[".whl"], kind="nvidia-h200", timeout_s=420)
# This script installs .whl/*.whl into /tmp/site when jsonschema does not import.
#
# On a CPU, everything small (the test, tests/test_bench.py):
#   DEVICE=cpu SMALL=1 OUT=/tmp/gpu PYTHON=.venv/bin/python bash bench/gpu.sh
set -u
OUT=${OUT:-$(dirname "$0")/../results/gpu}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit
cd "$(dirname "$0")/.." || exit
export DEVICE=${DEVICE:-cuda} PYTHON=${PYTHON:-python3} PYTHONUNBUFFERED=1
BUDGET_S=${BUDGET_S:-285}
export WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

if [ "${SMALL:-0}" = 1 ]; then  # every step on tiny sizes: checks the wiring, its numbers mean nothing
    SIZE=16 BIG=2 PAIR=2 REPEATS=1 PROFILE=1 EQ_SIZE=16 EQ_BATCH=2
    printf 'dataset:\n  image_size: 16\n' > "$WORK/small_16px.yaml"
    PROJECTION=(--max-batch 2 --config config.yaml config/paper.yaml "$WORK/small_16px.yaml")
else
    SIZE=224 BIG=256 PAIR=64 REPEATS=5 PROFILE=5 EQ_SIZE=32 EQ_BATCH=16
    PROJECTION=(--config config.yaml config/paper.yaml)
fi
# The kernel share is CUDA's alone; off CUDA no profile (on the CPU one MobileNetV4 step's profile
# takes minutes: its depthwise convolutions dispatch per channel), and the summary says n/a.
[ "$DEVICE" = cuda ] || PROFILE=0
printf 'runtime:\n  device: %s\n' "$DEVICE" > "$WORK/device.yaml"

if ! "$PYTHON" -c "import jsonschema" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

versions() {
    echo "device: $DEVICE"
    if command -v nvidia-smi >/dev/null; then
        echo "driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader)"
        nvidia-smi
    else
        echo "driver: none (no nvidia-smi)"
    fi
    "$PYTHON" bench/gpu_summary.py versions
}

train() {  # the smoke profile's teacher, then its W, as the DAG's jobs run them
    local configs="config.yaml config/smoke.yaml $WORK/device.yaml" rc
    "$PYTHON" workflow/scripts/teacher.py --seed 0 --ckpt "$WORK/teacher.pt" --metrics "$WORK/teacher.csv" \
        --config $configs --keys dataset runtime teacher evaluate.batch_size --log "$WORK/teacher.log" &&
    "$PYTHON" workflow/scripts/distill.py --seed 0 --arch resnet18 --teacher "$WORK/teacher.pt" --ckpt "$WORK/w.pt" \
        --metrics "$WORK/w.csv" --config $configs --keys dataset runtime kd evaluate.batch_size --log "$WORK/distill.log"
    rc=$?
    cat "$WORK"/teacher.log "$WORK"/distill.log 2>/dev/null | tr '\r' '\n' | grep -v -e '%|' -e '^ *$'  # no progress bars
    return $rc
}
export -f versions train

step() {  # step NAME CAP_S COMMAND...: COMMAND's output into $OUT/NAME.txt; its status into $WORK/steps.tsv
    local name=$1 cap=$2 start=$SECONDS left=$((BUDGET_S - SECONDS)) state rc
    shift 2
    if ((left < 10)); then
        state="skipped (budget spent)"
        echo "$state" > "$OUT/$name.txt"
    else
        ((cap > left)) && cap=$left
        timeout -k 10 "$cap" "$@" > "$OUT/$name.txt" 2>&1
        rc=$?
        case $rc in
            0) state=ok ;;
            124 | 137) state="timed out after $cap s" ;;
            *) state="failed (exit $rc)" ;;
        esac
    fi
    printf '%s\t%s\t%s\n' "$name" "$state" $((SECONDS - start)) >> "$WORK/steps.tsv"
    echo "$name: $state, $((SECONDS - start)) s"
}

SECONDS=0
step versions 30 bash -c versions
step pair_b256 90 "$PYTHON" bench/pair_step.py --device "$DEVICE" --size $SIZE --batch $BIG --repeats $REPEATS \
    --archs resnet18 regnetx_016
step pair_b64 120 "$PYTHON" bench/pair_step.py --device "$DEVICE" --size $SIZE --batch $PAIR --repeats $REPEATS \
    --profile $PROFILE --archs resnet18 regnetx_016 mobilenetv4_conv_medium
step mckp 30 "$PYTHON" bench/mckp.py --device "$DEVICE" --repeats $REPEATS
step projection 100 "$PYTHON" bench/projection.py --device "$DEVICE" --repeats $((REPEATS < 3 ? REPEATS : 3)) "${PROJECTION[@]}"
step train 90 bash -c train
step equivalence 90 "$PYTHON" bench/pair_equivalence.py --device "$DEVICE" --size $EQ_SIZE --batch $EQ_BATCH
"$PYTHON" bench/gpu_summary.py summary "$OUT" "$WORK/steps.tsv"
echo "total: $SECONDS s; outputs in $OUT"
! cut -f2 "$WORK/steps.tsv" | grep -qvx ok  # exit 1 when a step did not succeed
