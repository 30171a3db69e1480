"""Where this run differs from the paper, generated from study.json and the runs' run.json: each difference
with the option (or file) that changes it. report.md's second section and deviations.csv.

Part of chained_tuning/report (metrics.py's report; docs/metrics.md).
"""
import pandas as pd

from .findings import is_smoke_test
from .tables import train_info


def _configs(study):
    return [r.meta.get("config") for r in study.runs if isinstance(r.meta.get("config"), dict)]


def recipe_deviations(study, cfgs):
    """Gradient clipping and weight-decay exemptions: the training recipe beyond what the paper says."""
    out = []
    clip = [float(c["max_grad_norm"]) for c in cfgs if isinstance(c.get("max_grad_norm"), (int, float))]
    if any(v > 0 for v in clip):
        out.append((f"Gradient clipping at a global norm of {', '.join(f'{v:g}' for v in sorted(set(clip)) if v > 0)} "
                    "(the paper does not clip, or does not say)", "finetune.py --max_grad_norm 0 turns it off"))
    nwd = [r.meta.get("optimizer", {}).get("no_weight_decay") for r in study.runs if isinstance(r.meta.get("optimizer"),
                                                                                                 dict)]
    if any(nwd):
        names = sorted({str(n) for v in nwd if v for n in (v if isinstance(v, list) else [v])})
        out.append((f"No weight decay on {', '.join(names)} (the paper: weight decay 0.1, on every weight as far as "
                    "it says)", "no option: finetune.py's make_optimizer"))
    elif study.runs:
        out.append(("Weight decay exemptions not recorded in run.json (finetune.py exempts norm weights and biases "
                    "from weight decay; the paper applies 0.1 without saying which weights)",
                    "no option: finetune.py's make_optimizer"))
    return out


def scoring_deviations(study, tasks):
    """How answers are scored and worded, how ToxiGen's groups are counted, how relative forgetting divides."""
    out = []
    if tasks - {"saferdialogues"}:
        out.append(("Each option is scored by the summed log-likelihood of its whole answer sentence (\"The best "
                    "answer is A.\"); ToxiGen's two answers differ in length, so a sum favours the shorter one where "
                    "a per-token mean would not. The paper does not say how it scores", "no option: evaluate.py "
                    "scores by the sum (its --scorer fast|naive only change how it is computed)"))
    if "toxigen" in tasks and any(train_info(r).get("group_rule") for r in study.runs):
        out.append(("A ToxiGen sentence that targets several groups is counted for the least frequent of them "
                    "(one group per example); the paper does not say", "no option: tasks.load_toxigen"))
    if study.table1:
        out.append(("Relative forgetting (Figure 2) is divided by the first task's overall accuracy "
                    "Acc_A(theta_A); the paper prints a per-group Acc_A(theta_A, g), probably a typo",
                    "no option: metrics.relative_forgetting"))
    if tasks & {"arc", "csqa", "bbq"}:
        out.append(("The answers read \"The best answer is X.\" (the paper's appendix templates); section 3.2 says "
                    "\"The correct answer is\"", "no option: synthetic.py's templates"))
    return out


def data_set_deviations(study):
    """The data sets the first stages trained on (run.json's train_info) and BBQ's categories, against Table 2."""
    out = []
    infos = [train_info(r) for r in study.runs if r.stage == 1]
    arc = {i.get("arc_choices") for i in infos if "arc_choices" in i}
    if "all" in arc:
        out.append(("ARC-Easy keeps its 3- and 5-choice questions (2251 train / 2376 test; Table 2: 2241 / 2365, "
                    "the 4-choice ones)", "tasks.py --arc_choices 4 (load_task arc_choices=\"4\", the default)"))
    tsets = {i.get("test_set") for i in infos if "test_set" in i}
    if "fraction" in tsets:
        out.append(("ToxiGen's and BBQ's test sets are a seeded 30% of the data (Table 2: 4455 and 31107 examples, "
                    "nearly everything not used for training)", "load_task test_set=\"rest\" (tasks.py --test_set "
                    "rest): every example not used for training or validation"))
    fill = {i.get("cells") for i in infos if i.get("n_groups")}
    if "fill" in fill:
        out.append(("Training sets of the tasks with groups are topped up to --train_size (2261) instead of the same "
                    "count per (group, label) cell (Table 2: 2236 = 26 x 86, 2241 = 27 x 83)",
                    "load_task cells=\"equal\" (tasks.py --cells equal; the default on real data)"))
    hv = [i["human_validation"] for i in infos if isinstance(i.get("human_validation"), dict)]
    if hv and not any(h.get("used") for h in hv):
        out.append(("BBQ's training set holds no human-validated items (the paper takes them first): BBQ's "
                    "supplemental/MTurk_validation files are not in the data folder",
                    "copy the official repository's supplemental/ folder into DATA_DIR/bbq/"))
    bbq_groups = [len(r.eval["tasks"]["bbq"].get("groups") or {}) for r in study.runs
                  if r.eval and "bbq" in r.eval.get("tasks", {})]
    if bbq_groups and max(bbq_groups) < 9 and not is_smoke_test(study):
        out.append((f"BBQ has {max(bbq_groups)} of its 9 categories here (the data folder lacks the others)",
                    "add the missing DATA_DIR/bbq/data/<Category>.jsonl files"))
    return out


def setting_deviations(study, cfgs):
    """Steps, batch size, sequence length, weight decay, evaluation subsets, seeds, learning rates and the
    first-stage choice, against the paper's settings."""
    out = []
    for key, paper, what, flag in (("steps", 100, "optimisation steps", "--steps (STEPS)"),
                                   ("batch_size", 16, "batch size", "--batch_size"),
                                   ("max_length", 2048, "sequence length", "--max_length"),
                                   ("weight_decay", 0.1, "weight decay", "--weight_decay")):
        vals = [c.get(key) for c in cfgs if isinstance(c.get(key), (int, float))]
        if vals and any(v != paper for v in vals):
            out.append((f"{what.capitalize()} {', '.join(f'{v:g}' for v in sorted(set(vals)))} (paper: {paper:g})",
                        f"finetune.py {flag}"))
    limits = {str(c.get("eval_limit")) for c in cfgs if c.get("eval_limit")} | (
        {str(study.study_json["eval_limit"])} if study.study_json.get("eval_limit") else set())
    if limits:
        out.append((f"Models are evaluated on stratified subsets of {', '.join(sorted(limits))} "
                    "test examples per task, not whole test sets", "EVAL_LIMIT= (empty) / evaluate.py without --limit"))
    if len(study.seeds) < 3:
        out.append((f"{len(study.seeds)} seed{'s' if len(study.seeds) > 1 else ''} (paper: 3)"
                    + (": no std over seeds, no error bars" if len(study.seeds) == 1 else ""), "SEEDS=\"0 1 2\""))
    lrs = sorted({float(r.lr) for r in study.runs})
    if lrs and (min(lrs) > 2e-5 or max(lrs) < 1e-6):
        note = next((r.meta.get("lr_note") for r in study.runs if r.meta.get("lr_note")), "")
        out.append((f"Learning rates {', '.join(f'{v:g}' for v in lrs)} (paper: 1e-6 to 2e-5 around 1e-5)"
                    + (f": {note}" if note else ""), "LRS, MAIN_LR / finetune.py --lr"))
    first = study.study_json.get("first_stage")
    if first in ("main", "caption"):
        out.append(("Every chain starts from the first-stage model at the main lr (Table 1's caption); section 3.1 "
                    "picks the best first-stage model on validation", "FIRST_STAGE=best"))
    return out


def model_and_data_deviations(study, tasks):
    """Replay's batch, the model, the data source and a missing SaFeRDialogues."""
    out = []
    replay_settings = [s.get("settings") for _, s in study.replay if isinstance(s.get("settings"), dict)]
    replay_bs = sorted({st.get("global_batch_size", st.get("batch_size")) for st in replay_settings} - {None}, key=str)
    if replay_bs and any(b != 128 for b in replay_bs):
        out.append((f"Replay stages use a global batch of {', '.join(map(str, replay_bs))} (appendix 9.4: batch 16, "
                    "global batch 128)", "REPLAY_BATCH (the paper profile's default 128, in micro-batches of 16) / "
                    "replay.py --batch_size 128 --micro_batch_size 16"))
    models = sorted({str(r.meta.get("base_model")) for r in study.runs if r.meta.get("base_model")})
    if models and not any("llama-2-7b" in m.lower() for m in models):
        out.append((f"Model: {', '.join(models)}, not Llama-2-7B", "MODEL=/path/to/Llama-2-7b-hf (PROFILE=paper)"))
    sources = sorted({str((r.meta.get("data") or {}).get("source")) for r in study.runs} - {"None"})
    if "synthetic" in sources:
        out.append(("Data: the embedded synthetic stand-in tasks, not the released data sets",
                    "DATA_DIR=../shared/data (PROFILE=real-tiny or paper)"))
    if "saferdialogues" not in tasks:
        out.append(("SaFeRDialogues is not in this run (the paper's third safety task)",
                    "SAFE=\"toxigen bbq saferdialogues\" with its data in DATA_DIR/saferdialogues"))
    return out


def deviations(study):
    """[(item, the option that changes it)] for this run; items it does not have are left out."""
    cfgs, tasks = _configs(study), set(study.capability + study.safety)
    return (recipe_deviations(study, cfgs) + scoring_deviations(study, tasks) + data_set_deviations(study)
            + setting_deviations(study, cfgs) + model_and_data_deviations(study, tasks))


def deviations_section(study):
    items = deviations(study)
    text = ("## Where this run differs from the paper\n\nGenerated from this run's study.json and run.json settings; "
            "each item names what changes it.\n\n")
    text += "\n".join(f"- {what}. Changed by: {how}." for what, how in items) if items else "Nothing recorded differs."
    table = pd.DataFrame(items, columns=["difference", "changed_by"])
    return text + "\n", {"deviations.csv": table.to_csv(index=False)}
