#!/usr/bin/env bash
# The chained-tuning study, end to end: base model -> first-stage model per task and learning rate
# (theta_A) -> every capability/safety chain in both orders (theta_AB) and the learning-rate sweeps of
# the first and second stage (every model evaluated on its tasks by finetune.py --eval_tasks) ->
# replay, mitigated and longer chains, side by side with the curvature of the first-stage minima and
# the Taylor check of every chain -> metrics, tables, figures and report.md.
#
#   bash run_all.sh                                    # profile tiny: synthetic tasks, tiny model
#   bash run_all.sh --dry_run                          # the plan (stages, GPU-hours, disk) -> $RUNS/plan.json
#   bash run_all.sh --status                           # the graph and each stage's state
#   PROFILE=real-tiny DATA_DIR=../shared/data bash run_all.sh
#   FETCH=1 PROFILE=real-tiny DATA_DIR=~/data/chained bash run_all.sh   # the datasets fetched first (tasks.py --fetch)
#   PROFILE=paper MODEL=/models/Llama-2-7b-hf DATA_DIR=/data GPUS_PER_STAGE=8 bash run_all.sh
#   PROFILE=paper MODEL=... DATA_DIR=... EXECUTOR=slurm SLURM_PARTITION=gpu SLURM_ACCOUNT=lab bash run_all.sh
#
# This prepares the environment (scripts/setup_env.sh; SKIP_SETUP=1 uses $PY as it is) and runs
# study.py, which holds the study as a graph of stages and runs it (a local pool of JOBS stages, each
# with GPUS_PER_STAGE devices of its own, or Slurm through submitit). Idempotent: a stage whose output
# exists is skipped when it was made with the settings asked for now (logs/<stage>.settings.json);
# otherwise the study stops with exit code 2, naming the stage, the setting and both values, unless
# REDO=changed. Every stage prints one line; its full output goes to $RUNS/logs/<stage>.log. The
# variables and the runs folder: docs/study.md.
set -uo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
set +e
# FETCH=1: the datasets fetched into DATA_DIR first (tasks.py --fetch: downloads only what is missing or fails its
# check; a failed fetch stops here with its own one-line error).
if [ "${FETCH:-0}" = "1" ]; then
  [ -n "${DATA_DIR:-}" ] || { echo "error: FETCH=1 needs DATA_DIR, the folder to fetch the datasets into" >&2; exit 2; }
  "$PY" tasks.py --fetch "$DATA_DIR" || exit $?
fi
exec "$PY" study.py "$@"
