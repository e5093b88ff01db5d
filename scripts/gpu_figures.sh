#!/usr/bin/env bash
# Every figure of README.md's "On a GPU" section, in one go, on a machine with a GPU:
#
#   scripts/gpu_figures.sh OUT_DIR [CORPUS_DIR]      # CORPUS_DIR: ../shared/multi30k
#
# 1. the Multi30k recipe at the GPU's default precision (bf16), with the machine to
#    itself: its wall time, steps and tokens/s;
# 2. the same recipe and seed at fp32, on half the CPU cores, while `make test` runs on
#    the other half (the suite on a CUDA machine, its CUDA tests included);
# 3. test2016 scored for both average.pt (beam 5; sacreBLEU and Moses-tokenized lowercased
#    BLEU), and the time to translate it with beam 5;
# 4. `make bench` on the GPU: step time and tokens/s of ours and nn.Transformer, TFLOP/s
#    against the bf16 matmul peak of the same run, peak memory.
# OUT_DIR gets every log and summary.txt, a line per figure. Runs go to a temporary
# folder. EXTRA="train.max_steps=30" adds overrides to both trainings (a dry run), and
# DEVICE=cpu runs the benchmarks on the CPU (to try the script without a GPU).
set -uo pipefail
out=${1:?usage: scripts/gpu_figures.sh OUT_DIR [CORPUS_DIR]}
corpus=${2:-../shared/multi30k}
device=${DEVICE:-cuda}
mkdir -p "$out"
runs=$(mktemp -d)
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
cores=$(nproc)
half=$((cores > 1 ? cores / 2 : 1))

pin() {  # pin CORES COMMAND...: COMMAND on those CPU cores (where there are two or more)
  local which=$1
  shift
  if ((cores > 1)) && command -v taskset > /dev/null; then taskset -c "$which" "$@"; else "$@"; fi
}

recipe() {  # recipe NAME PRECISION [CORES]: train, then say what it took
  local name=$1 precision=$2 start=$SECONDS
  pin "${3:-0-$((cores - 1))}" make train CONFIG=configs/multi30k.yaml ARGS="data.path=$corpus \
    train.runs_dir=$runs train.name=$name train.precision=$precision ${EXTRA:-}" \
    > "$out/train-$name.log" 2>&1
  local rc=$? took=$((SECONDS - start))
  say "recipe $name: exit $rc, $took s wall; $(grep -o 'step [0-9]* |[^|]*|[^|]*|[^|]*|[^|]*| [0-9]* tokens/s' \
    "$out/train-$name.log" | tail -1)"
  say "recipe $name: $(grep -o 'device [^|]*' "$out/train-$name.log" | head -1)|\
 $(grep -o 'stopped by .*' "$out/train-$name.log" | tail -1)"
}

say "$(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "|",
  torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")') | $cores cores"
recipe bf16 auto

pin "$half-$((cores - 1))" make test > "$out/test.log" 2>&1 &
tests=$!
recipe fp32 fp32 "0-$((half - 1))"
wait $tests
say "make test: exit $?, $(tail -1 "$out/test.log")"

for name in bf16 fp32; do
  make evaluate CKPT="$runs/$name/average.pt" ARGS="data.path=$corpus" \
    > "$out/evaluate-$name.log" 2>&1
  say "test2016 $name average.pt: $(grep -o 'translated in .*' "$out/evaluate-$name.log");\
 $(grep -E '^(BLEU|chrF)' "$out/evaluate-$name.log" | sed -E 's/ +\(.*//; s/ +/ /g' \
    | paste -sd ';')"
done
make bench-decode CKPT="$runs/bf16/average.pt" \
  ARGS="data.path=$corpus --device $device --json $out/bench_decode.json" \
  > "$out/bench-decode.log" 2>&1
say "decoding: $(grep -i 'beam' "$out/bench-decode.log" | tail -1)"
make bench ARGS="--device $device --quick --skip-epochs --json $out/bench_train.json" \
  > "$out/bench.log" 2>&1
say "make bench: exit $?, table in bench.log"
rm -rf "$runs"
