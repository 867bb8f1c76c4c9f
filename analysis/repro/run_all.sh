#!/usr/bin/env bash
# The whole small-scale retrieval reproduction on one machine, stage after stage:
#   s1 pretrain (one GPU) -> s2 extend every variant -> s3 evaluate every variant and f (and their intermediate s2
#   checkpoints, EVAL_STEPS="1000 2000" by default; EVAL_STEPS= to skip) -> table, summary.png, steps.png.
# s2 and s3 run their variants side by side, one GPU each (GPUS=N to choose; default: every visible GPU), or
# JOBS_PER_GPU=K at a time on each GPU (default 1; on a single GPU, 4 fills the gaps between this small model's kernels).
# Each stage resumes from its checkpoints, so rerunning after an interruption continues where it stopped.
#   bash analysis/repro/run_all.sh            # from anywhere; checkpoints in outputs/repro, results committed-ready
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
GPUS=${GPUS:-$($PY -c 'import torch; print(max(1, torch.cuda.device_count()))')}
R=${RESULTS:-analysis/results/repro}  # where a machine syncs the tracked tree away: an ignored folder (outputs/...)
D="$PY analysis/repro/run_stage.py --results $R ${TOY:+--toy}"  # TOY=1: the CPU smoke-test sizes
echo "repro: $GPUS GPU(s), start $(date -u +%T)"
$D s1
$D heads s1                                             # where s1 copies the passkey from (retrieval heads)
echo "repro: s1 finished $(date -u +%T)"
$D s2 all --gpus "$GPUS" --jobs-per-gpu "${JOBS_PER_GPU:-1}"
echo "repro: s2 finished $(date -u +%T)"
$D heads all --gpus "$GPUS" --jobs-per-gpu "${JOBS_PER_GPU:-1}"  # each variant's retrieval heads (s1: above)
$D s3 all --gpus "$GPUS" --jobs-per-gpu "${JOBS_PER_GPU:-1}"
echo "repro: s3 finished $(date -u +%T)"
for step in ${EVAL_STEPS-1000 2000}; do  # intermediate s2 checkpoints: accuracy against training steps
  $D s3 all --step "$step" --gpus "$GPUS" --jobs-per-gpu "${JOBS_PER_GPU:-1}"
done
$D table
echo "repro: ALL DONE $(date -u +%T)"
