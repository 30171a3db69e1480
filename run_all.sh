#!/usr/bin/env bash
# The chained-tuning study, end to end: base model -> first-stage model per task and learning rate
# (theta_A) -> every capability/safety chain in both orders (theta_AB) and the learning-rate sweeps of
# the first and second stage (every model evaluated on its tasks by finetune.py --eval_tasks) ->
# replay, mitigated and longer chains, side by side with the curvature of the first-stage minima and
# the Taylor check of every chain -> metrics, tables, figures and report.md.
#
#   bash run_all.sh                                    # profile tiny: synthetic tasks, tiny model
#   PROFILE=real-tiny DATA_DIR=../shared/data bash run_all.sh
#   PROFILE=paper MODEL=/models/Llama-2-7b-hf DATA_DIR=/data NPROC=8 bash run_all.sh
#
# Idempotent: a stage whose output exists is skipped (outputs appear only once complete), so an
# interrupted study resumes by running this again; but only when the output was made with the settings
# asked for now (recorded per stage in $RUNS/logs/<stage>.settings.json by stage_check.py): otherwise the
# study stops with exit code 2, naming the stage, the setting and both values, before the stages of that
# step run. REDO=changed makes such stages again instead (and the ones built on them). Every stage
# prints one line; its full output goes to $RUNS/logs/<stage>.log. Any variable below can be set from
# the environment.
set -uo pipefail
cd "$(dirname "$0")"
PROFILE="${PROFILE:-${1:-tiny}}"
source scripts/setup_env.sh
set +e  # a failed stage is recorded and the study goes on (setup_env.sh sets -e)
T_START=$(date +%s)

case "$PROFILE" in
  tiny|real-tiny)
    # Two-point learning-rate sweeps, evaluation subsets and short replay sweeps keep the whole
    # study within 10 minutes on 2 cores (fewer than 100 steps a stage leaves csqa2 at chance).
    if [ "$PROFILE" = tiny ]; then
      DATA_DIR="${DATA_DIR:-}"; EVAL_LIMIT="${EVAL_LIMIT:-200}"
      LR_NOTE="learning rates scaled for the tiny model (the paper sweeps 1e-6..2e-5 around 1e-5 for Llama-2-7B)"
    else
      DATA_DIR="${DATA_DIR:-../shared/data}"; EVAL_LIMIT="${EVAL_LIMIT:-300}"
      LR_NOTE="learning rates scaled for the tiny model on the real datasets (paper: 1e-6..2e-5 for Llama-2-7B); evaluation on stratified subsets of $EVAL_LIMIT test examples per task"
    fi
    MODEL="${MODEL:-tiny}"; SEEDS="${SEEDS:-0}"
    LRS="${LRS:-1e-3 2e-3}"; MAIN_LR="${MAIN_LR:-1e-3}"; STEPS="${STEPS:-100}"
    VAL_LIMIT="${VAL_LIMIT:-100}"; CURV_SAMPLES="${CURV_SAMPLES:-50}"
    FIRST_LR_CHAINS="${FIRST_LR_CHAINS-toxigen-arc}"
    SECOND_LR_CHAINS="${SECOND_LR_CHAINS-toxigen-arc arc-toxigen}"
    REPLAY_FRACTIONS="${REPLAY_FRACTIONS:-0,0.01,0.05,1}"; REPLAY_STEPS="${REPLAY_STEPS:-0,5,100}"
    LAUNCH=("$PY"); EXTRA="${EXTRA:-}"; JOBS="${JOBS:-2}"
    REPLAY_CHAINS="${REPLAY_CHAINS-toxigen-arc}"; MITIGATION_CHAINS="${MITIGATION_CHAINS-toxigen-arc}"
    CHAINS="${CHAINS-toxigen-arc-csqa2}";;
  paper)
    MODEL="${MODEL:?set MODEL to a Llama-2-7B checkpoint folder}"; DATA_DIR="${DATA_DIR:?set DATA_DIR to the datasets folder}"
    SEEDS="${SEEDS:-0 1 2}"; LRS="${LRS:-1e-6 5e-6 1e-5 1.5e-5 2e-5}"; MAIN_LR="${MAIN_LR:-1e-5}"; STEPS="${STEPS:-100}"
    EVAL_LIMIT="${EVAL_LIMIT:-}"; VAL_LIMIT="${VAL_LIMIT:-}"; CURV_SAMPLES="${CURV_SAMPLES:-50}"
    FIRST_LR_CHAINS="${FIRST_LR_CHAINS-toxigen-arc toxigen-csqa toxigen-csqa2 bbq-arc bbq-csqa bbq-csqa2}"
    SECOND_LR_CHAINS="${SECOND_LR_CHAINS-toxigen-arc toxigen-csqa toxigen-csqa2 bbq-arc bbq-csqa bbq-csqa2 arc-toxigen}"
    LAUNCH=(torchrun --nproc_per_node="${NPROC:-8}"); EXTRA="${EXTRA:---bf16}"; JOBS="${JOBS:-1}"
    REPLAY_CHAINS="${REPLAY_CHAINS-toxigen-arc toxigen-csqa toxigen-csqa2 bbq-arc bbq-csqa bbq-csqa2}"
    MITIGATION_CHAINS="${MITIGATION_CHAINS-$REPLAY_CHAINS}"; CHAINS="${CHAINS-toxigen-arc-csqa2 arc-toxigen-csqa}"
    LR_NOTE="the paper's learning rates";;
  *) echo "error: unknown PROFILE '$PROFILE'; use tiny, real-tiny or paper" >&2; exit 2;;
esac
REPLAY_FRACTIONS="${REPLAY_FRACTIONS:-0,0.01,0.05,0.1,0.2,0.4,0.6,0.8,1}"  # fractions of A's training set
REPLAY_STEPS="${REPLAY_STEPS:-0,5,10,20,40,60,80,100}"
MITIGATIONS="${MITIGATIONS-mix0.05 l2_0.01 ewc_100}"   # replay during stage 2 (a 0.05 share), L2 to theta_A, EWC
for m in $MITIGATIONS; do  # checked before any stage: mix<P> in percent was the old spelling
  case "$m" in
    mix*) awk -v f="${m#mix}" 'BEGIN{exit !(f ~ /^[0-9.]+$/ && f > 0 && f <= 1)}' || {
      echo "error: MITIGATIONS: '$m' is not mix<F> with F a fraction in (0, 1] (a 5% share is mix0.05)" >&2; exit 2; };;
    l2_*|ewc_*) ;;
    *) echo "error: MITIGATIONS: unknown '$m'; use mix<F> (F in (0, 1]), l2_<LAMBDA> or ewc_<LAMBDA>" >&2; exit 2;;
  esac
done
CAP="${CAP:-arc csqa csqa2}"
SAFE="${SAFE:-toxigen bbq}"   # SaFeRDialogues joins when its (generative) evaluation exists
RUNS="${RUNS:-runs/$PROFILE}"
REDO="${REDO:-}"
case "$REDO" in
  ""|changed) ;;
  *) echo "error: REDO='$REDO' is not allowed; use REDO=changed (make again the stages whose output was made with other settings) or leave it unset" >&2; exit 2;;
esac
DATA_ARGS=(); [ -n "$DATA_DIR" ] && DATA_ARGS=(--data_dir "$DATA_DIR")
EVAL_ARGS=(); [ -n "$EVAL_LIMIT" ] && EVAL_ARGS=(--limit "$EVAL_LIMIT")
VAL_ARGS=(); [ -n "$VAL_LIMIT" ] && VAL_ARGS=(--limit "$VAL_LIMIT")
EVAL_LIMIT_ARGS=(); [ -n "$EVAL_LIMIT" ] && EVAL_LIMIT_ARGS=(--eval_limit "$EVAL_LIMIT")
VAL_LIMIT_ARGS=(); [ -n "$VAL_LIMIT" ] && VAL_LIMIT_ARGS=(--eval_val_limit "$VAL_LIMIT")
mkdir -p "$RUNS/logs"
FAILFILE="$RUNS/logs/failed.txt"; : >"$FAILFILE"
MISMATCH="$RUNS/logs/settings_mismatch.txt"; : >"$MISMATCH"
PRECHECK=0  # 1 while a step's stages are only checked (see checked below)
# Small models gain nothing from a second thread: run JOBS independent stages side by side instead.
[ "$JOBS" -gt 1 ] && export OMP_NUM_THREADS=1

say() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# stage NAME OUTPUT CMD...: run CMD unless OUTPUT exists and was made with the same settings; its output
# goes to the stage's log, its settings to logs/NAME.settings.json. A mismatch is written to $MISMATCH
# (the study stops at the end of the step) unless REDO=changed: then the output is removed and made
# again (the folder in STAGE_FOLDER when the caller sets one: a marker's whole sweep), with the files in
# the caller's STAGE_ALSO (the Taylor checks a curvature stage wrote into its chains).
stage() {
  local name="$1" out="$2" note rc; shift 2
  [ "$PRECHECK" = 0 ] && [ -s "$MISMATCH" ] && return 1  # stopping: start nothing new
  if [ -e "$out" ]; then
    note="$("$PY" stage_check.py check "$RUNS" "$name" "$out" -- "$@")"; rc=$?
    if [ "$rc" = 0 ]; then
      [ "$PRECHECK" = 1 ] || say "done already: $name ($out)${note:+; $note}"
      return 0
    fi
    if [ "$rc" != 3 ]; then failed "$name"; say "FAILED: settings check of $name ($out)"; return 1; fi
    if [ "$REDO" != changed ]; then printf '%s\n' "$note" >>"$MISMATCH"; return 1; fi
    [ "$PRECHECK" = 1 ] && return 0
    say "redo (REDO=changed): $name"; printf '%s\n' "$note" | sed 's/^/    /'
    rm -rf "${STAGE_FOLDER:-$out}" "$RUNS/logs/$name.settings.json"
    [ -n "${STAGE_ALSO+x}" ] && rm -f "${STAGE_ALSO[@]}"
  fi
  [ "$PRECHECK" = 1 ] && return 0
  say "$name -> $out"
  if ! "$@" >"$RUNS/logs/$name.log" 2>&1; then
    echo "$name" >>"$FAILFILE"
    say "FAILED: $name (log: $RUNS/logs/$name.log)"
    tail -n 3 "$RUNS/logs/$name.log" | sed 's/^/    /'
    return 1
  fi
  "$PY" stage_check.py record "$RUNS" "$name" "$out" -- "$@" || { failed "$name"; say "FAILED: recording the settings of $name"; return 1; }
}

failed() { [ "$PRECHECK" = 1 ] || echo "$1" >>"$FAILFILE"; }

# bg CMD...: run CMD in the background, at most JOBS at a time; `wait` joins them.
bg() {
  if [ "$PRECHECK" = 1 ]; then "$@"; return 0; fi
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
  "$@" &
}

# checked STEP: every stage of the function STEP is checked first (nothing runs; its lines are not shown),
# so an output made with other settings stops the study before any stage of that step starts; then STEP.
checked() {
  PRECHECK=1; "$@" >/dev/null; PRECHECK=0
  stop_on_mismatch
  "$@"
  stop_on_mismatch
}
stop_on_mismatch() {
  [ -s "$MISMATCH" ] || return 0
  wait
  say "STOPPED: outputs in $RUNS were made with other settings than this study asks for:"
  sed 's/^/    /' "$MISMATCH"
  say "choose one: another RUNS folder for these settings (RUNS=runs/<new> bash run_all.sh); the settings those outputs were made with; or REDO=changed to make those stages again in $RUNS (the stages built on them follow). study.json and the results were left as they were."
  exit 2
}

finetune() {  # finetune NAME PARENT TASK LR SEED OUT [extra finetune.py args]
  local name="$1" parent="$2" task="$3" lr="$4" seed="$5" out="$6"; shift 6
  stage "$name" "$out" "${LAUNCH[@]}" finetune.py --model "$parent" --task "$task" --lr "$lr" --seed "$seed" \
    --steps "$STEPS" --out "$out" "${DATA_ARGS[@]}" $EXTRA "$@"
}

# finetune_eval NAME PARENT TASK LR SEED OUT EVAL_TASKS [extra finetune.py args]: a stage tuned and then
# evaluated on EVAL_TASKS (test split) in the same process; a folder left by an older or interrupted
# study without its eval.json gets one from evaluate.py.
finetune_eval() {
  local name="$1" out="$6" tasks="$7" head=("${@:1:6}"); shift 7
  finetune "${head[@]}" "$@" --eval_tasks "$tasks" "${EVAL_LIMIT_ARGS[@]}" || return 1
  [ -e "$out/eval.json" ] || evaluate "eval-$name" "$out" "$tasks" "$out/eval.json" "${EVAL_ARGS[@]}"
}

evaluate() {  # evaluate NAME MODEL_DIR TASKS OUT [extra args]
  local name="$1" dir="$2" tasks="$3" out="$4"; shift 4
  [ -d "$dir" ] || { say "skipped: $name (no model at $dir)"; return 1; }
  stage "$name" "$out" "$PY" evaluate.py --model "$dir" --tasks "$tasks" --out "$out" "${DATA_ARGS[@]}" "$@"
}

# The first-stage model a chain starts from: the best of the task's learning-rate sweep on its
# validation split (ties go to the main learning rate), as in the paper.
best_stage1() {  # best_stage1 TASK SEED -> folder
  "$PY" - "$RUNS/stage1/$1" "$2" "$MAIN_LR" $LRS <<'EOF'
import json, os, sys
root, seed, main_lr, lrs = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4:]
best = None
for lr in lrs:
    f = os.path.join(root, f"lr{lr}", f"seed{seed}", "eval_val.json")
    if os.path.isfile(f):
        acc = next(iter(json.load(open(f))["tasks"].values()))["acc"]
        key = (acc, -abs(float(lr) - main_lr))
        if best is None or key > best[0]:
            best = (key, os.path.dirname(f))
print(best[1] if best else "")
EOF
}

say "study: profile $PROFILE, model $MODEL, data ${DATA_DIR:-synthetic}, seeds [$SEEDS], lrs [$LRS] (main $MAIN_LR; $LR_NOTE) -> $RUNS"

# 0. The base model (the tiny one is built once and cached).
if [ "$MODEL" = "tiny" ]; then
  say "base: tiny Llama (built once, then cached) -> $("$PY" -c 'import tiny_base; print(tiny_base.tiny_base_path())')"
  "$PY" tiny_base.py >"$RUNS/logs/base-tiny.log" 2>&1 || { say "FAILED: base (log: $RUNS/logs/base-tiny.log)"; exit 1; }
fi

# 1. First-stage models: every task, learning rate and seed; each evaluated on its task's test and
#    validation splits (finetune.py --eval_tasks: evaluate.py's work, in the training process).
first_stage() {  # first_stage TASK LR SEED
  local t="$1" lr="$2" s="$3" d="$RUNS/stage1/$1/lr$2/seed$3"
  finetune_eval "stage1-$t-lr$lr-seed$s" "$MODEL" "$t" "$lr" "$s" "$d" "$t" \
    --eval_val_tasks "$t" "${VAL_LIMIT_ARGS[@]}" || return 1
  [ -e "$d/eval_val.json" ] || evaluate "evalval-stage1-$t-lr$lr-seed$s" "$d" "$t" "$d/eval_val.json" \
    --split validation "${VAL_ARGS[@]}"
}
first_stages() {
  for t in $CAP $SAFE; do for lr in $LRS; do for s in $SEEDS; do bg first_stage "$t" "$lr" "$s"; done; done; done
  wait
}
checked first_stages
declare -A BEST  # the first-stage model each chain starts from, per task and seed
for t in $CAP $SAFE; do for s in $SEEDS; do BEST[$t-$s]="$(best_stage1 "$t" "$s")"; done; done

# 2. Chains: capability -> safety and safety -> capability, from the best first-stage model, at the
#    main learning rate; plus the first-stage and second-stage learning-rate sweeps (a sweep point
#    that is a main chain runs once).
chain_dir() {  # chain_dir A B PARENT LR_B SEED -> the chain's folder
  local lra; lra="$(basename "$(dirname "$3")")"
  echo "$RUNS/stage2/$1-$2/lrA${lra#lr}_lrB$4/seed$5"
}
chain() {  # chain A B PARENT LR_B SEED
  local a="$1" b="$2" parent="$3" lrb="$4" s="$5" lra
  lra="$(basename "$(dirname "$parent")")"; lra="${lra#lr}"
  finetune_eval "stage2-$a-$b-lrA$lra-lrB$lrb-seed$s" "$parent" "$b" "$lrb" "$s" "$(chain_dir "$@")" "$a,$b"
}
declare -A QUEUED
queue_chain() {  # queue_chain A B PARENT_LR LR_B SEED (PARENT_LR "best": the sweep's best)
  local a="$1" b="$2" lra="$3" lrb="$4" s="$5" parent d
  if [ "$lra" = best ]; then parent="${BEST[$a-$s]:-}"; else parent="$RUNS/stage1/$a/lr$lra/seed$s"; fi
  if [ -z "$parent" ] || [ ! -d "$parent" ]; then say "skipped: chain $a-$b seed $s (no first-stage model)"; failed "chain-$a-$b-seed$s"; return 1; fi
  d="$(chain_dir "$a" "$b" "$parent" "$lrb" "$s")"
  [ -n "${QUEUED[$d]+x}" ] && return 0
  QUEUED[$d]=1
  bg chain "$a" "$b" "$parent" "$lrb" "$s"
}
chains() {
  QUEUED=()
  for s in $SEEDS; do
    for c in $CAP; do for f in $SAFE; do
      queue_chain "$c" "$f" best "$MAIN_LR" "$s"
      queue_chain "$f" "$c" best "$MAIN_LR" "$s"
    done; done
    for ab in $FIRST_LR_CHAINS; do for lr in $LRS; do queue_chain "${ab%-*}" "${ab#*-}" "$lr" "$MAIN_LR" "$s"; done; done
    for ab in $SECOND_LR_CHAINS; do for lr in $LRS; do queue_chain "${ab%-*}" "${ab#*-}" best "$lr" "$s"; done; done
  done
  wait
}
checked chains

# 3. Mitigation: replay as a third stage (a sweep over the fraction of the first task's data and one
#    over steps) on REPLAY_CHAINS; replay during the second stage and regularised second stages
#    (MITIGATIONS) on MITIGATION_CHAINS; chains longer than two (CHAINS, e.g. toxigen-arc-csqa2).
#    Side by side with them: the curvature of the first-stage minima (the models the chains start
#    from; CURVATURE=all: every first-stage model; none: no curvature), each with the Taylor check of
#    its main chains.
main_chain_dir() {  # main_chain_dir A B SEED -> the Table 1 chain's folder
  [ -n "${BEST[$1-$3]:-}" ] || return 1
  chain_dir "$1" "$2" "${BEST[$1-$3]:-}" "$MAIN_LR" "$3"
}
replay_sweeps() {  # replay_sweeps A B SEED (one after the other: they share --out and its 0 and whole-set points)
  local a="$1" b="$2" s="$3" d out; d="$(main_chain_dir "$a" "$b" "$s")"
  [ -n "$d" ] && [ -d "$d" ] || { say "skipped: replay $a-$b seed $s (no chain)"; failed "replay-$a-$b-seed$s"; return 1; }
  out="$RUNS/replay/$a-$b/seed$s"
  local STAGE_FOLDER="$out"  # REDO of either sweep starts the folder afresh (they share its points)
  local common=(replay.py --model "$d" --task "$a" --out "$out" --first_stage "${BEST[$a-$s]:-}" \
    --lr "$MAIN_LR" --seed "$s" "${DATA_ARGS[@]}")
  [ -n "$EVAL_LIMIT" ] && common+=(--eval_limit "$EVAL_LIMIT")
  stage "replay-fractions-$a-$b-seed$s" "$out/.fractions-$REPLAY_FRACTIONS" bash -c \
    '"$@" && touch "'"$out/.fractions-$REPLAY_FRACTIONS"'"' _ "$PY" "${common[@]}" --fractions "$REPLAY_FRACTIONS" --steps "$STEPS"
  stage "replay-steps-$a-$b-seed$s" "$out/.steps-$REPLAY_STEPS" bash -c \
    '"$@" && touch "'"$out/.steps-$REPLAY_STEPS"'"' _ "$PY" "${common[@]}" --steps_sweep "$REPLAY_STEPS"
}
mitigated_chain() {  # mitigated_chain A B METHOD SEED
  local a="$1" b="$2" m="$3" s="$4" parent="${BEST[$1-$4]:-}" args
  [ -n "$parent" ] || { failed "mitigation-$a-$b-$m-seed$s"; return 1; }
  case "$m" in
    mix*) args=(--replay_task "$a" --replay_fraction "${m#mix}");;  # a share in (0, 1], as finetune.py takes it
    l2_*) args=(--l2_to_init "${m#l2_}");;
    ewc_*) args=(--ewc "${m#ewc_}" --ewc_task "$a");;
    *) say "unknown mitigation '$m' (use mix<F> with F a fraction in (0, 1], l2_<LAMBDA>, ewc_<LAMBDA>)"; failed "mitigation-$m"; return 1;;
  esac
  local d="$RUNS/mitigation/$a-$b/$m/seed$s"
  finetune_eval "mitigation-$a-$b-$m-seed$s" "$parent" "$b" "$MAIN_LR" "$s" "$d" "$a,$b" "${args[@]}"
}
long_chain() {  # long_chain A-B-C... SEED: stage 1 is the best first-stage model of A, stage 2 the main chain
  local spec="$1" s="$2" parent k=1 t tasks; IFS=- read -r -a tasks <<<"$spec"
  parent="${BEST[${tasks[0]}-$s]:-}"; [ -n "$parent" ] || { failed "longchain-$spec-seed$s"; return 1; }
  for t in "${tasks[@]:1}"; do
    k=$((k + 1))
    if [ "$k" = 2 ] && [ -d "$(main_chain_dir "${tasks[0]}" "$t" "$s")" ]; then
      parent="$(main_chain_dir "${tasks[0]}" "$t" "$s")"  # the Table 1 chain is this chain's stage 2
      continue
    fi
    local d="$RUNS/longchain/$spec/seed$s/$k-$t" all; all="$(IFS=,; echo "${tasks[*]}")"
    finetune_eval "longchain-$spec-$k-$t-seed$s" "$parent" "$t" "$MAIN_LR" "$s" "$d" "$all" || return 1
    parent="$d"
  done
}
curvature() {  # curvature TASK SEED FOLDER: rho at FOLDER, with the Taylor check of the main chains from it
  local t="$1" s="$2" d="$3" lr refs=() c out STAGE_ALSO=()
  lr="$(basename "$(dirname "$d")")"; out="$RUNS/curvature/$t/$lr/seed$s/curvature.json"
  if [ "$d" = "${BEST[$t-$s]:-}" ]; then
    for c in $CAP $SAFE; do
      local r; r="$(main_chain_dir "$t" "$c" "$s")"
      [ "$c" != "$t" ] && [ -d "$r" ] && STAGE_ALSO+=("$r/taylor.json")  # from this spectrum: a REDO remakes them
      [ "$c" != "$t" ] && [ -d "$r" ] && [ ! -e "$r/taylor.json" ] && refs+=("$r")
    done
  fi
  local taylor=(); [ ${#refs[@]} -gt 0 ] && taylor=(--reference "${refs[@]}" --taylor_out taylor.json)
  stage "curvature-$t-$lr-seed$s" "$out" "$PY" curvature.py --model "$d" --task "$t" --samples "$CURV_SAMPLES" \
    --seed "$s" --out "$out" "${DATA_ARGS[@]}" "${taylor[@]}"
}
later_stages() {
  local s ab t d dirs spec m
  for s in $SEEDS; do
    for ab in $REPLAY_CHAINS; do bg replay_sweeps "${ab%-*}" "${ab#*-}" "$s"; done
    for t in $CAP $SAFE; do
      case "${CURVATURE:-best}" in
        all) dirs=("$RUNS"/stage1/"$t"/lr*/seed"$s");; none) dirs=();; *) dirs=("${BEST[$t-$s]:-}");;
      esac
      for d in "${dirs[@]}"; do [ -n "$d" ] && [ -d "$d" ] && bg curvature "$t" "$s" "$d"; done
    done
    for ab in $MITIGATION_CHAINS; do for m in $MITIGATIONS; do bg mitigated_chain "${ab%-*}" "${ab#*-}" "$m" "$s"; done; done
    for spec in $CHAINS; do bg long_chain "$spec" "$s"; done
  done
  wait
}
checked later_stages
# Taylor checks a resumed study still lacks (the spectrum is read back: one HVP each).
for s in $SEEDS; do for c in $CAP; do for f in $SAFE; do for ab in "$c-$f" "$f-$c"; do
  a="${ab%-*}"; parent="${BEST[$a-$s]:-}"; [ -n "$parent" ] || continue
  d="$(main_chain_dir "$a" "${ab#*-}" "$s")"
  curv="$RUNS/curvature/$a/$(basename "$(dirname "$parent")")/seed$s/curvature.json"
  [ -d "$d" ] && [ -f "$curv" ] && [ ! -e "$d/taylor.json" ] || continue
  bg stage "taylor-$ab-seed$s" "$d/taylor.json" "$PY" curvature.py --model "$parent" --task "$a" --samples "$CURV_SAMPLES" \
    --seed "$s" --reference "$d" --spectrum_from "$curv" --out "$d/taylor.json" "${DATA_ARGS[@]}"
done; done; done; done
wait
stop_on_mismatch

# Written once every stage is done: each output of this study was made, or checked to have been made,
# with these settings (an older study's study.json stays while a mismatch stops this one).
"$PY" - "$RUNS/study.json" <<EOF
import json, sys, os
from common import write_json_atomic
write_json_atomic(sys.argv[1], {"profile": "$PROFILE", "model": "$MODEL", "data_dir": "${DATA_DIR:-synthetic}",
    "seeds": "$SEEDS".split(), "lrs": [float(x) for x in "$LRS".split()], "main_lr": float("$MAIN_LR"),
    "lr": float("$MAIN_LR"), "steps": int("$STEPS"), "eval_limit": "${EVAL_LIMIT}" or None,
    "val_limit": "${VAL_LIMIT}" or None, "curvature_samples": int("$CURV_SAMPLES"),
    "replay_fractions": [float(x) for x in "$REPLAY_FRACTIONS".split(",") if x],
    "replay_steps": [int(x) for x in "$REPLAY_STEPS".split(",") if x], "extra_args": "$EXTRA",
    "capability_tasks": "$CAP".split(), "safety_tasks": "$SAFE".split(), "lr_note": "$LR_NOTE",
    "units": "replay_fractions: fractions of the first task's training set",
    "settings_records": "logs/<stage>.settings.json: the settings each stage's output was made with"})
EOF
if [ -d "$RUNS/curvature" ]; then  # curvature-guided order, checked against the measured chains
  say "order -> $RUNS/results/order.json"
  mkdir -p "$RUNS/results"
  "$PY" order.py --tasks "$(echo $CAP $SAFE | tr ' ' ,)" --curvature "$RUNS/curvature" --runs "$RUNS" \
    --out "$RUNS/results/order.json" >"$RUNS/logs/order.log" 2>&1 || { failed order; say "FAILED: order (log: $RUNS/logs/order.log)"; }
fi

# 4. Metrics, tables, figures, report.
# (always rerun: it summarises whatever runs exist, naming the missing ones)
say "metrics -> $RUNS/results"
if ! "$PY" metrics.py --runs "$RUNS" --out "$RUNS/results" --profile "$PROFILE" >"$RUNS/logs/metrics.log" 2>&1; then
  failed metrics; say "FAILED: metrics (log: $RUNS/logs/metrics.log)"; tail -n 3 "$RUNS/logs/metrics.log" | sed 's/^/    /'
fi

T_END=$(date +%s)
say "study finished in $((T_END - T_START))s; report: $RUNS/results/report.md"
if [ -s "$FAILFILE" ]; then
  say "$(wc -l <"$FAILFILE") stage(s) failed or were skipped: $(tr '\n' ' ' <"$FAILFILE")"
  exit 1
fi
