"""study.py's graph, nothing trained: the paper profile planned by a dry run from a 7B-shaped config.json alone
(stages per kind, dependencies, commands, totals), the first-stage choice on a validation tie, and the GPU sets
and rendezvous ports the local pool hands out."""
import json
import os
import subprocess
import sys

import pytest

import metrics
import study
from conftest import DATA, ROOT, needs_data

LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float16"}
PAPER = {"PROFILE": "paper", "MODEL": "/models/llama", "DATA_DIR": "/data"}


@pytest.fixture(scope="module")
def paper_plan(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    model = tmp / "llama-2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))  # no weights, no tokenizer
    data = DATA if os.path.isdir(DATA) else str(tmp / "no-data")
    env = {**os.environ, "PROFILE": "paper", "MODEL": str(model), "DATA_DIR": data, "RUNS": str(tmp / "runs"),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "study.py", "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    plan = json.loads((tmp / "runs" / "plan.json").read_text())
    return r, plan, {s["name"]: s for s in plan["stages"]}, env


def test_paper_plan_counts_the_stages_of_every_kind(paper_plan):
    r, plan, _, _ = paper_plan
    # 6 tasks x 5 lrs x 3 seeds; per seed 18 main chains + 7 first-lr and 7 second-lr sweep chains x 4 lrs
    # that are no main chain; 9 replay chains x 2 sweeps; 9 x 3 mitigations; 2 three-task chains (stage 3 only);
    # curvature of each task's chosen model (its Taylor checks inside); the base model evaluated once, and the
    # 2 stages each three-task chain shares with the study evaluated on its later tasks
    assert plan["totals"]["stages"] == {"first_stage": 90, "chain": 3 * (18 + 28 + 28), "replay": 54,
                                        "curvature": 18, "mitigation": 81, "longchain": 6, "evaluate": 1 + 3 * 2 * 2}
    assert not any(s["done"] for s in plan["stages"])
    assert plan["n_params"] == 6_738_415_616 and plan["checkpoint_bytes"] == 2 * 6_738_415_616
    assert plan["totals"]["gpu_hours"] > 0 and plan["totals"]["disk_bytes"] > 100 * plan["checkpoint_bytes"]
    assert "estimated from the data's characters" in r.stdout and "GPU-hours" in r.stdout and "disk:" in r.stdout
    assert any("MFU" in a for a in plan["cost_assumptions"])
    if os.path.isdir(DATA):
        assert plan["tokens"] > 1e8


def test_a_model_tokenizer_that_does_not_load_is_named_not_a_traceback(tmp_path):
    model = tmp_path / "llama-2-7b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA2_7B))
    (model / "tokenizer.json").write_text("{}")
    env = {**os.environ, "PROFILE": "paper", "MODEL": str(model), "DATA_DIR": str(tmp_path / "no-data"),
           "RUNS": str(tmp_path / "runs")}
    r = subprocess.run([sys.executable, "study.py", "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "is not a tokenizers file" in r.stderr and str(model) in r.stderr
    assert not (tmp_path / "runs" / "plan.json").exists()


def test_paper_plan_dependencies_and_commands(paper_plan):
    _, _, st, _ = paper_plan
    first = [f"stage1-toxigen-lr{lr}-seed0" for lr in ("1e-6", "5e-6", "1e-5", "1.5e-5", "2e-5")]
    for name in first:
        assert st[name]["after"] == [] and st[name]["gpus"] == 8
        assert " -m torch.distributed.run --nproc_per_node=8 finetune.py " in st[name]["cmd"]
        assert "--bf16" in st[name]["cmd"] and "--eval_val_tasks toxigen" in st[name]["cmd"]
    main = st["stage2-toxigen-arc-lrA1e-5-lrB1e-5-seed0"]  # from the chosen model, planned at the main lr
    assert main["after"] == ["choose-toxigen-seed0"] and main["pending_choice"]
    assert st["stage2-arc-toxigen-lrA2e-5-lrB1e-5-seed0"]["after"] == ["stage1-arc-lr2e-5-seed0"]  # Figure 8a
    for ab in ("saferdialogues-csqa", "csqa-saferdialogues"):  # SaFeRDialogues like the other safety tasks
        assert f"stage2-{ab}-lrA1e-5-lrB1e-5-seed0" in st
    curv = st["curvature-toxigen-lr1e-5-seed0"]
    assert curv["gpus"] == 1 and set(curv["after"]) >= {"choose-toxigen-seed0",
                                                         "stage2-toxigen-arc-lrA1e-5-lrB1e-5-seed0",
                                                         "stage2-toxigen-csqa2-lrA1e-5-lrB1e-5-seed0"}
    assert curv["cmd"].count("/stage2/toxigen-") == 3 and "--taylor_out taylor.json" in curv["cmd"]
    rf, rs = st["replay-fractions-saferdialogues-arc-seed1"], st["replay-steps-saferdialogues-arc-seed1"]
    assert "--batch_size 128 --micro_batch_size 16" in rf["cmd"] and " -m torch.distributed.run " in rf["cmd"]
    assert rs["after"] == rf["after"] + [rf["name"]]
    assert "--ewc 100 --ewc_task bbq" in st["mitigation-bbq-csqa-ewc_100-seed2"]["cmd"]
    assert st["longchain-toxigen-arc-csqa2-3-csqa2-seed0"]["after"] == ["stage2-toxigen-arc-lrA1e-5-lrB1e-5-seed0"]


def assert_every_after_is_a_listed_node(plan):
    listed = {s["name"]: s for s in plan["stages"]}
    unresolved = [(s["name"], a) for s in plan["stages"] for a in s["after"] if a not in listed]
    assert not unresolved, unresolved[:5]
    choices = [s for s in plan["stages"] if s["kind"] == "choice"]
    assert choices and [{"name": s["name"], "after": s["after"]} for s in choices] == plan["choices"]
    assert all(not s["done"] and s["state"] == "waiting" for s in choices)  # nothing trained yet
    order = list(listed)
    assert all(order.index(a) < order.index(s["name"]) for s in plan["stages"] for a in s["after"])  # inputs first


def test_plan_json_lists_every_node_its_stages_wait_for(paper_plan, tmp_path):
    """plan.json's `after` names only nodes plan.json lists: the choices of the first-stage model are nodes of
    kind "choice" (per task and seed), in the paper profile and in the tiny one."""
    _, plan, st, _ = paper_plan
    assert_every_after_is_a_listed_node(plan)
    assert st["choose-toxigen-seed0"]["kind"] == "choice" and len(plan["choices"]) == 6 * 3
    assert st["choose-toxigen-seed0"]["after"][:2] == ["stage1-toxigen-lr1e-6-seed0", "stage1-toxigen-lr5e-6-seed0"]
    env = {**os.environ, "PROFILE": "tiny", "RUNS": str(tmp_path / "runs"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "study.py", "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    tiny = json.loads((tmp_path / "runs" / "plan.json").read_text())
    assert_every_after_is_a_listed_node(tiny)
    assert len(tiny["choices"]) == 6 and tiny["totals"]["stages"]["first_stage"] == 12  # choices are no stages


def test_status_prints_every_stage_with_its_state(paper_plan):
    _, _, st, env = paper_plan
    r = subprocess.run([sys.executable, "study.py", "--status"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert sum(line.startswith("ready") for line in lines) == 91  # the first stages and eval-base wait for nothing
    assert any(line.startswith("waiting") and "stage2-toxigen-arc-lrA1e-5-lrB1e-5-seed0" in line for line in lines)
    assert lines[-1].startswith("states: ready 91, waiting ")


def write_val(runs, task, lr, acc):
    d = runs / "stage1" / task / f"lr{lr}" / "seed0"
    d.mkdir(parents=True)
    (d / "run.json").write_text("{}")
    (d / "eval.json").write_text(json.dumps({"tasks": {task: {"acc": acc}}}))
    (d / "eval_val.json").write_text(json.dumps({"tasks": {task: {"acc": acc}}}))


def test_a_validation_tie_is_decided_by_the_one_rule(tmp_path):
    """5e-6 and 1.5e-5 tie: run_all.sh's old |lr - main| rule took 5e-6 (equally far), metrics.py's log rule
    1.5e-5; now the study's graph starts every chain, the curvature and replay from the lr metrics.py picks."""
    runs = tmp_path / "runs"
    accs = {"1e-6": 0.50, "5e-6": 0.61, "1e-5": 0.55, "1.5e-5": 0.61, "2e-5": 0.40}
    for lr, acc in accs.items():
        write_val(runs, "toxigen", lr, acc)
    chosen = metrics.choose_first_stage({float(k): v for k, v in accs.items()}, 1e-5)
    assert chosen == 1.5e-5
    c = study.settings({**PAPER, "RUNS": str(runs), "CAP": "arc", "SAFE": "toxigen", "SEEDS": "0"})
    d, _ = study.decide_first_stage(c, "toxigen", "0")
    assert d == f"{runs}/stage1/toxigen/lr1.5e-5/seed0"
    g = study.Builder(c, {}, plan=True).build().stages
    assert "stage2-toxigen-arc-lrA1.5e-5-lrB1e-5-seed0" in g and "curvature-toxigen-lr1.5e-5-seed0" in g
    assert f"--first_stage {d}" in " ".join(g["replay-fractions-toxigen-arc-seed0"].cmd)
    assert "stage2-toxigen-arc-lrA5e-6-lrB1e-5-seed0" in g  # the first-lr sweep point, not the main chain
    package = os.path.join("chained_tuning", "study")
    study_files = ["study.py", "run_all.sh"] + [os.path.join(package, f)
                                                for f in sorted(os.listdir(os.path.join(ROOT, package)))
                                                if f.endswith(".py")]
    src = "".join(open(os.path.join(ROOT, f)).read() for f in study_files)
    graph_src = open(os.path.join(ROOT, "chained_tuning", "study", "graph.py")).read()
    assert "from ..runs import choose_first_stage" in graph_src and "log(" not in src  # no copy of the rule


def test_first_stage_main_starts_every_chain_from_the_main_lr(tmp_path):
    runs = tmp_path / "runs"
    for lr, acc in (("1e-5", 0.3), ("2e-5", 0.9)):
        write_val(runs, "toxigen", lr, acc)
    c = study.settings({**PAPER, "RUNS": str(runs), "LRS": "1e-5 2e-5", "FIRST_STAGE": "main"})
    assert study.decide_first_stage(c, "toxigen", "0")[0].endswith("/lr1e-5/seed0")
    with pytest.raises(study.UserError, match="FIRST_STAGE=main needs MAIN_LR=1e-5 among LRS"):
        study.settings({**PAPER, "LRS": "2e-5", "FIRST_STAGE": "main"})


def fake_stage(tmp_path, name, gpus):
    """A stage whose command prints the devices and the launcher flags it was given (no torchrun started)."""
    prog = "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES'], *sys.argv[2:])"
    return study.Stage(name, "chain", str(tmp_path / name), [sys.executable, "-c", prog, "torch.distributed.run",
                                                             f"--nproc_per_node={gpus}"], gpus=gpus)


def run_pool(pool, tmp_path, stages):
    """Start what fits, in order, as the study does; returns {name: (devices, port)} from the logs."""
    waiting, started, seen = list(stages), [], {}
    while waiting or pool.running():
        for st in list(waiting):
            if pool.can_start(st):
                pool.start(st, str(tmp_path / f"{st.name}.log"))
                started.append((st.name, sorted(pool.running())))
                waiting.remove(st)
        for name, st, rc in pool.wait():
            assert rc == 0
            devices, port, nproc = (tmp_path / f"{name}.log").read_text().split()
            seen[name] = (devices.split(","), port, nproc)
    return seen, started


def test_the_local_pool_gives_each_stage_its_own_gpus_and_port(tmp_path):
    c = study.settings({**PAPER, "GPUS": "0,1,2,3,4,5,6,7", "GPUS_PER_STAGE": "4", "EVAL_GPUS": "2", "JOBS": "4"})
    pool = study.LocalPool(c)
    seen, started = run_pool(pool, tmp_path, [fake_stage(tmp_path, "a", 4), fake_stage(tmp_path, "b", 4),
                                              fake_stage(tmp_path, "eval", 2)])
    assert started[1] == ("b", ["a", "b"])  # two 4-GPU stages side by side; the evaluation waits for devices
    assert set(seen["a"][0]).isdisjoint(seen["b"][0]) and len(seen["a"][0]) == len(seen["b"][0]) == 4
    assert seen["a"][1] != seen["b"][1] and seen["a"][1].startswith("--master_port=")
    assert len(seen["eval"][0]) == 2 and seen["eval"][2] == "--nproc_per_node=2"
    c = study.settings({**PAPER, "GPUS": "8", "GPUS_PER_STAGE": "6", "EVAL_GPUS": "2", "JOBS": "2"})
    seen, started = run_pool(study.LocalPool(c), tmp_path, [fake_stage(tmp_path, "train", 6),
                                                             fake_stage(tmp_path, "eval2", 2)])
    assert started[1] == ("eval2", ["eval2", "train"])  # an evaluation beside a training
    assert sorted(seen["train"][0] + seen["eval2"][0]) == [str(i) for i in range(8)]
    with pytest.raises(study.UserError, match="GPUS_PER_STAGE=8 but only 4 GPUs"):
        study.LocalPool(study.settings({**PAPER, "GPUS": "0,1,2,3"}))


def test_bad_study_variables_are_refused_by_name():
    for env, msg in ((dict(PAPER, EXECUTOR="pbs"), "EXECUTOR='pbs' is not allowed"),
                     (dict(PAPER, KEEP_WEIGHTS="some"), "KEEP_WEIGHTS='some' is not allowed"),
                     ({"PROFILE": "paper"}, "PROFILE=paper: set MODEL"),
                     (dict(PAPER, JOBS="two"), "JOBS='two' is not a whole number")):
        with pytest.raises(study.UserError, match=msg):
            study.settings(env)


@needs_data
def test_dry_run_checks_the_data_as_tasks_check_does(tmp_path):
    from chained_tuning.data import fetch
    from chained_tuning.data.tasks import LOADERS, TASKS
    env = {**os.environ, "PROFILE": "real-tiny", "DATA_DIR": DATA, "RUNS": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "study.py", "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    plan = json.loads((tmp_path / "runs" / "plan.json").read_text())
    assert plan["data"] == fetch.inspect(DATA, TASKS, loaders=LOADERS)  # the one check, as `tasks.py --check` prints
    assert plan["data_dir"] == DATA and f"data (python tasks.py --check {DATA}" in r.stdout
    assert {row["task"]: row["status"] for row in plan["data"]}["arc"] == "complete"


def test_paper_plan_prints_memory_per_gpu_from_the_cost_model(paper_plan):
    """The dry run's memory rows are cost_model's figures: the training row recomputed here from the padded batch
    the plan states (8 GPUs, 2 sequences a GPU); every row says whether it fits, and the plan prints them."""
    r, plan, _, _ = paper_plan
    from chained_tuning.study import cost_model as cm

    rows = {row["what"].split(",")[0]: row for row in plan["memory"]}
    train = rows["training"]
    seq = float(train["what"].split(" x ")[1].split()[0])
    shape = cm.LLAMA2_7B
    plain = cm.train_memory_per_gpu(plan["n_params"], 8, 2 * seq, shape["layers"], shape["hidden"],
                                    cm.ACT_BYTES_PER_TOKEN_LAYER, False, vocab=shape["vocab"])
    assert train["bytes"] == pytest.approx(plain, rel=0.01) and train["fits"] == "fits"
    assert {"training", "evaluation", "curvature solve over all weights"} <= set(rows)
    assert all(row["fits"] and row["gpu"] == cm.DEFAULT_GPU for row in plan["memory"])
    assert "memory per GPU" in r.stdout and f"{plain / 1e9:.1f} GB" in r.stdout


def test_curvature_measures_count_in_the_plan():
    """A curvature stage with CURV_MEASURES costs its measures' HVPs at their defaults on top of rho's solve: trace
    30, density 4 x 30, topk and each block at most 100 (blocks: the layers, the embeddings and the head)."""
    from chained_tuning.hessian.measure_names import worst_case_hvps
    from chained_tuning.study import cost_model as cm

    assert worst_case_hvps(["rho", "trace", "density"], 34) == 150
    assert worst_case_hvps(["topk", "blocks"], 34) == 100 + 34 * 100
    shape, n = cm.LLAMA2_7B, cm.n_params()

    def secs(measures):
        st = study.Stage("curvature-arc", "curvature", "x", ["curvature.py"], gpus=8,
                         cost={"task": "arc", "samples": 50, "refs": 0, "measures": measures})
        return study.stage_gpu_seconds(st, 0, 1000.0, 0, n, shape, "bfloat16")

    one_hvp = cm.stage_gpu_seconds("hvp", 1000.0, n, 8, shape=shape)
    assert secs(["rho", "trace"]) - secs(["rho"]) == pytest.approx(30 * one_hvp, rel=1e-9)


def test_curvature_measure_settings_are_passed_on_and_checked_before_anything(tmp_path):
    """CURV_MEASURE_ARGS (the tiny profile: a third of the default products) reaches every curvature stage; a bad
    one is refused with one line naming the variable, before any stage."""
    env = {**os.environ, "PROFILE": "tiny", "RUNS": str(tmp_path / "runs")}
    r = subprocess.run([sys.executable, "study.py", "--dry_run"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads((tmp_path / "runs" / "plan.json").read_text())
    curv = [s["cmd"] for s in plan["stages"] if s["kind"] == "curvature"]
    assert curv and all("--measures rho,trace,density,topk,blocks --trace_products 12 --slq_probes 2 "
                        "--slq_steps 16 --topk 3" in c for c in curv)
    for bad, said in (("--slq_probes 1", "--slq_probes must be at least 2"), ("--rtol 1", "'--rtol' is not one of"),
                      ("--topk x", "--topk 'x' is not a whole number")):
        r = subprocess.run([sys.executable, "study.py", "--dry_run"], cwd=ROOT, capture_output=True, text=True,
                           env={**env, "CURV_MEASURE_ARGS": bad, "RUNS": str(tmp_path / "bad")}, timeout=300)
        assert r.returncode == 2 and "CURV_MEASURE_ARGS: " in r.stderr and said in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not (tmp_path / "bad").exists()
