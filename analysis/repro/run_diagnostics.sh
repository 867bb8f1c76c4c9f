#!/usr/bin/env bash
# Run 5 of the retrieval reproduction: why LongGen AttnSink (b) falls short of full attention at this small
# scale while BlockSparse (c) and full-at-the-top (e_top) do not. Two experiments side by side on a 4-GPU machine,
# each its own driver on two GPUs:
#   placement  (GPUs 0,1): the 8-layer s1 again (run_all.sh's config and seed) -> retrieval heads of s1 ->
#              s2 b_upper_mid, c_upper_mid (full layers [3, 4, 5], the other middle third of 8), and a, b again
#              (two jobs per GPU) -> s3 -> their retrieval heads
#   model size (GPUs 2,3): the same recipe with 12 layers ("middle" = [4, 5, 6, 7]) -> heads of s1 -> s2 a, b ->
#              s3 a, b -> their heads
# Results: $RESULTS/repro_diag and $RESULTS/repro_12l (RESULTS default analysis/results; on a machine whose copy of
# the working tree is re-synced between sessions, point it at an ignored folder such as outputs/results and tar it:
# the sync removes files created in tracked folders). Checkpoints: outputs/repro_diag, outputs/repro_12l. 8.5 min on
# 4 H200s.
#   heads_rule (one GPU, run on its own): a 12-layer s1 -> its retrieval heads -> s2 a and b_heads (AttnSink with the
#              full layers the heads suggest) -> s3 -> their heads -> table. Results $RESULTS/repro_12l_rule.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
R=${RESULTS:-analysis/results}
D="$PY analysis/repro/run_stage.py ${TOY:+--toy}"  # TOY=1: the CPU smoke-test sizes
mkdir -p outputs

# One experiment: NAME GPUS VARIANTS JOBS_PER_GPU [KEY=VALUE ...] -- s1 on the first of GPUS (the overrides go to s1
# and s2) -> heads of s1 -> s2, s3 and heads of VARIANTS over GPUS -> table. Checkpoints outputs/NAME, results $R/NAME.
pipeline() {
  local name=$1 gpus=$2 variants=$3 jobs=$4; shift 4
  local O=(--outputs "outputs/$name" --results "$R/$name") set=() n
  for kv in "$@"; do set+=(--set "$kv"); done
  n=$(tr ',' '\n' <<< "$gpus" | wc -l)
  local P=(--gpus "$n" --jobs-per-gpu "$jobs" "${O[@]}")
  CUDA_VISIBLE_DEVICES=${gpus%%,*} $D s1 "${O[@]}" "${set[@]}"
  CUDA_VISIBLE_DEVICES=${gpus%%,*} $D heads s1 "${O[@]}"
  CUDA_VISIBLE_DEVICES=$gpus $D s2 "$variants" "${P[@]}" "${set[@]}"
  CUDA_VISIBLE_DEVICES=$gpus $D s3 "$variants" "${P[@]}"
  CUDA_VISIBLE_DEVICES=$gpus $D heads "$variants" "${P[@]}"
  $D table "${O[@]}"
}

# a and b again beside the upper middle third: their retrieval heads, and run 4's numbers re-created
placement() { pipeline repro_diag 0,1 b_upper_mid,c_upper_mid,a,b 2; }
model_size() { pipeline repro_12l 2,3 a,b 1 model.num_layers=12; }
# one GPU: does placing the full layers on s1's retrieval heads rescue the 12-layer hybrid?
# RULE_VARIANTS=b_heads: half the time, but no same-s1 baseline for perplexity
heads_rule() { pipeline repro_12l_rule 0 "${RULE_VARIANTS:-a,b_heads}" 2 model.num_layers=12; }

# bash run_diagnostics.sh [EXPERIMENT...]: placement, model_size (default: both, side by side) or heads_rule
echo "diagnostics: start $(date -u +%T)"
pids=()
for e in "${@:-placement model_size}"; do
  for x in $e; do
    case $x in placement|model_size|heads_rule) ;; *) echo "unknown experiment $x (placement, model_size, heads_rule)"; exit 2;; esac
    $x > "outputs/diag_$x.log" 2>&1 & pids+=("$x:$!")
  done
done
failed=0
for p in "${pids[@]}"; do
  st=0; wait "${p#*:}" || st=$?
  echo "diagnostics: ${p%%:*} finished (exit $st) $(date -u +%T); log outputs/diag_${p%%:*}.log"
  [ "$st" = 0 ] || failed=1
done
if [ "$failed" != 0 ]; then echo "diagnostics: FAILED"; exit 1; fi
echo "diagnostics: ALL DONE $(date -u +%T)"
