#!/usr/bin/env bash
# Run 5 of the retrieval reproduction (issue 7): why LongGen AttnSink (b) falls short of full attention at this small
# scale while BlockSparse (c) and full-at-the-top (e_top) do not. Two experiments side by side on a 4-GPU machine,
# each its own driver on two GPUs:
#   placement  (GPUs 0,1): the 8-layer s1 again (run_all.sh's config and seed) -> retrieval heads of s1 ->
#              s2 b_upper_mid, c_upper_mid (full layers [3, 4, 5], the other middle third of 8), and a, b again
#              (two jobs per GPU) -> s3 -> their retrieval heads
#   model size (GPUs 2,3): the same recipe with 12 layers ("middle" = [4, 5, 6, 7]) -> heads of s1 -> s2 a, b ->
#              s3 a, b -> their heads
# Results: $RESULTS/repro_diag and $RESULTS/repro_12l (RESULTS default analysis/results; on the device tool point it
# at an ignored folder such as outputs/results and tar it: the tool's sync of the working tree removes files that a
# previous call created in tracked folders). Checkpoints: outputs/repro_diag, outputs/repro_12l. 8.5 min on 4 H200s.
#   heads_rule (one GPU, run on its own): a 12-layer s1 -> its retrieval heads -> s2 a and b_heads (AttnSink with the
#              full layers the heads suggest) -> s3 -> table. Results $RESULTS/repro_12l_rule.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
R=${RESULTS:-analysis/results}
D="$PY analysis/repro/run_stage.py ${TOY:+--toy}"  # TOY=1: the CPU smoke-test sizes
mkdir -p outputs

placement() {
  local O=(--outputs outputs/repro_diag --results "$R/repro_diag")
  CUDA_VISIBLE_DEVICES=0 $D s1 "${O[@]}"
  CUDA_VISIBLE_DEVICES=0 $D heads s1 "${O[@]}"
  local V=b_upper_mid,c_upper_mid,a,b  # a and b again: their retrieval heads, and run 4's numbers re-created
  CUDA_VISIBLE_DEVICES=0,1 $D s2 $V --gpus 2 --jobs-per-gpu 2 "${O[@]}"
  CUDA_VISIBLE_DEVICES=0,1 $D s3 $V --gpus 2 --jobs-per-gpu 2 "${O[@]}"
  CUDA_VISIBLE_DEVICES=0,1 $D heads $V --gpus 2 --jobs-per-gpu 2 "${O[@]}"
  $D table "${O[@]}"
}

model_size() {
  local O=(--outputs outputs/repro_12l --results "$R/repro_12l")
  CUDA_VISIBLE_DEVICES=2 $D s1 "${O[@]}" --set model.num_layers=12
  CUDA_VISIBLE_DEVICES=2 $D heads s1 "${O[@]}"
  CUDA_VISIBLE_DEVICES=2,3 $D s2 a,b --gpus 2 "${O[@]}" --set model.num_layers=12
  CUDA_VISIBLE_DEVICES=2,3 $D s3 a,b --gpus 2 "${O[@]}"
  CUDA_VISIBLE_DEVICES=2,3 $D heads a,b --gpus 2 "${O[@]}"
  $D table "${O[@]}"
}

heads_rule() {  # one GPU: does placing the full layers on s1's retrieval heads rescue the 12-layer hybrid?
  local O=(--outputs outputs/repro_12l_rule --results "$R/repro_12l_rule")
  CUDA_VISIBLE_DEVICES=0 $D s1 "${O[@]}" --set model.num_layers=12
  CUDA_VISIBLE_DEVICES=0 $D heads s1 "${O[@]}"
  local V=${RULE_VARIANTS:-a,b_heads}  # RULE_VARIANTS=b_heads: half the time, but no same-s1 baseline for perplexity
  CUDA_VISIBLE_DEVICES=0 $D s2 "$V" --gpus 1 --jobs-per-gpu 2 "${O[@]}" --set model.num_layers=12
  CUDA_VISIBLE_DEVICES=0 $D s3 "$V" --gpus 1 --jobs-per-gpu 2 "${O[@]}"
  CUDA_VISIBLE_DEVICES=0 $D heads b_heads "${O[@]}"
  $D table "${O[@]}"
}

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
