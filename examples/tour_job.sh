#!/usr/bin/env bash
# A toy job for the README's Slurm tour: "trains" one step per second and commits a checkpoint
# every 5 steps with `hpc-ckpt commit`; on start it resumes from RUN_DIR/last_checkpoint. Until
# `hpc-ckpt wrap` lands, this is how a job uses the store by hand.
#
# Usage (inside sbatch): examples/tour_job.sh RUN_DIR [TOTAL_STEPS]
set -euo pipefail
RUN=$1
TOTAL=${2:-60}
step=0
if [[ -f $RUN/last_checkpoint ]]; then
    hpc-ckpt verify "$RUN/checkpoints/$(cat "$RUN/last_checkpoint")" >/dev/null
    step=$(sed 's/^step-0*//; s/^$/0/' "$RUN/last_checkpoint")
    echo "resuming after step $step (job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0})"
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
while ((step < TOTAL)); do
    sleep 1
    step=$((step + 1))
    if ((step % 5 == 0)); then
        head -c $((4 << 20)) /dev/urandom >"$stage/model.bin"
        echo "{\"global_step\": $step}" >"$stage/trainer_state.json"
        hpc-ckpt commit --run-dir "$RUN" --step $step --keep-last 3 "$stage"
    fi
done
echo "done at step $step"
