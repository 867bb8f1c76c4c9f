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
# previous call created in tracked folders). Checkpoints: outputs/repro_diag, outputs/repro_12l. ~10 min on 4 H100s.
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

echo "diagnostics: start $(date -u +%T)"
placement > outputs/diag_placement.log 2>&1 & p1=$!
model_size > outputs/diag_size.log 2>&1 & p2=$!
s1=0; s2=0
wait $p1 || s1=$?
echo "diagnostics: placement finished (exit $s1) $(date -u +%T); log outputs/diag_placement.log"
wait $p2 || s2=$?
echo "diagnostics: model size finished (exit $s2) $(date -u +%T); log outputs/diag_size.log"
if [ "$s1$s2" != "00" ]; then echo "diagnostics: FAILED"; exit 1; fi
echo "diagnostics: ALL DONE $(date -u +%T)"
