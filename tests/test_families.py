"""The family matrix: tiny random Llama, Mistral, Qwen2, Gemma, Phi-3, OLMo-2, GPT-NeoX, GPT-2 and OPT models
(tests/families.py, built here from their configs) through finetune (with L2, EWC and replay mixing), evaluate
(scored and generated tasks), curvature, and a 2-process FSDP2 finetune equal to one process: all nine in one
torchrun launch, plus the user's own `torchrun finetune.py` on GPT-2. Each stage is checked against a reference
of its own: the decoder blocks against each family's known attribute path, the scored log-likelihoods against one
unpadded forward per option, the replies against model.generate, the Hessian-vector products (fast paths on)
against plain double backward through the eager model, and the spectrum of a GPT-2 and a GPT-NeoX against the
dense Hessian.

Run: OMP_NUM_THREADS=1 python -m pytest -q tests/test_families.py   (about 60 s on 2 cores)
"""
import json

import pytest
import torch

from families import BLOCKS, FAMILIES, LAYERS, build_family, family_model, weight_mismatches
from test_curvature import dense_hessian, make_batch
from test_distributed import torchrun, weights

NAMES = list(FAMILIES)
# each family's blocks where its own code keeps them: the reference the generic discovery is checked against
PATHS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "gemma": "model.layers",
         "phi3": "model.layers", "olmo2": "model.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h",
         "opt": "model.decoder.layers"}
# the families whose last layer answer_rows.py runs at the answer rows (Llama's layout, no q/k norms, one fused
# qkv projection absent); the others step aside to the full forward, recorded as backend.last_layer "full"
ANSWER_ROWS = {"llama", "mistral", "qwen2", "gemma"}
STAGE = {"task": "toxigen", "lr": 1e-3, "steps": 3, "batch_size": 8, "train_size": 64, "seed": 0, "l2_to_init": 1.0,
         "ewc": 5.0, "ewc_task": "arc", "ewc_samples": 4, "replay_task": "arc", "replay_fraction": 0.25}
CLI = ["--task", "toxigen", "--lr", "1e-3", "--steps", "3", "--batch_size", "8", "--train_size", "64", "--seed", "0",
       "--l2_to_init", "1.0", "--ewc", "5.0", "--ewc_task", "arc", "--ewc_samples", "4", "--replay_task", "arc",
       "--replay_fraction", "0.25"]


def assert_same_weights(name, a, b):
    assert weight_mismatches(name, a, b, STAGE["lr"], STAGE["steps"]) == []


@pytest.fixture(scope="module")
def models(tiny_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: build_family(f, str(root), tiny_path) for f in NAMES}


@pytest.fixture(scope="module")
def tuned(models, tmp_path_factory):
    """Each family tuned once in this process and once by 2 gloo processes (all nine stages in one torchrun
    launch, as replay.py holds one process group across its points); GPT-2 also through `torchrun finetune.py`."""
    import finetune
    tmp = tmp_path_factory.mktemp("tuned")
    torch.set_num_threads(1)
    for f in NAMES:
        finetune.train_stage({**STAGE, "model": models[f], "out": str(tmp / "one" / f)})
    configs = [{**STAGE, "model": models[f], "out": str(tmp / "two" / f)} for f in NAMES]
    (tmp / "stages.json").write_text(json.dumps(configs))
    torchrun(tmp, "--stages", tmp / "stages.json")
    torchrun(tmp, "finetune.py", "--model", models["gpt2"], "--out", tmp / "cli" / "gpt2", *CLI)
    return tmp


@pytest.mark.parametrize("name", NAMES)
def test_decoder_blocks_found_by_class(name):
    from chained_tuning.families import decoder_blocks
    model = family_model(name)
    blocks = decoder_blocks(model, "FSDP2 sharding")
    where = model
    for part in PATHS[name].split("."):
        where = getattr(where, part)
    assert [id(b) for b in blocks] == [id(b) for b in where] and len(blocks) == LAYERS
    assert {type(b).__name__ for b in blocks} == {BLOCKS[name]}


def test_a_model_without_block_classes_is_refused_naming_its_family():
    from chained_tuning.common import UserError
    from chained_tuning.families import decoder_blocks
    model = family_model("gpt2")
    for m in model.modules():
        if hasattr(m, "_no_split_modules"):
            m._no_split_modules = None
    with pytest.raises(UserError, match=r"FSDP2 sharding does not support the gpt2 family \(GPT2LMHeadModel\)"):
        decoder_blocks(model, "FSDP2 sharding")


@pytest.mark.parametrize("name", NAMES)
def test_finetune_two_processes_equal_one(models, tuned, name):
    ra, rb = (json.load(open(tuned / d / name / "run.json")) for d in ("one", "two"))
    assert ra["run_id"] == rb["run_id"] and (ra["world_size"], rb["world_size"]) == (1, 2)
    assert ra["losses"] == pytest.approx(rb["losses"], rel=1e-5) and len(ra["losses"]) == 3
    ga, gb = ra["regularisation"], rb["regularisation"]
    assert ga["final_penalty"] > 0 and ga["final_penalty"] == pytest.approx(gb["final_penalty"], rel=1e-4)
    assert ga["fisher"]["fisher_sum"] == pytest.approx(gb["fisher"]["fisher_sum"], rel=1e-5)
    assert ra["replay"]["examples_replayed"] == rb["replay"]["examples_replayed"] > 0
    assert_same_weights(name, tuned / "one" / name, tuned / "two" / name)
    base, mine = weights(models[name]), weights(tuned / "one" / name)
    assert all(float((base[k] - mine[k]).norm()) > 0 for k in base)  # every tensor trained (all of them shard)


def test_torchrun_finetune_script_on_gpt2(tuned):
    """The user's path that used to end in AttributeError: 'GPT2LMHeadModel' object has no attribute 'model'."""
    ra, rb = (json.load(open(tuned / d / "gpt2" / "run.json")) for d in ("one", "cli"))
    assert ra["run_id"] == rb["run_id"] and rb["world_size"] == 2
    assert ra["losses"] == pytest.approx(rb["losses"], rel=1e-5)
    assert_same_weights("gpt2", tuned / "one" / "gpt2", tuned / "cli" / "gpt2")


@pytest.mark.parametrize("name", NAMES)
def test_evaluate_scores_and_generates(tuned, name, tmp_path):
    """evaluate.py's library on the tuned model: every option's log-likelihood (packed prefix, tree mask,
    restarted positions) equals one unpadded forward of prompt + option; every reply equals model.generate's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chained_tuning.classifier import default_classifier
    from chained_tuning.data.tasks import encode_pair
    from chained_tuning.evaluation import evaluate_checkpoint
    from chained_tuning.generation import encode_prompts, generate_batched, generate_reference, turn_stop_ids
    folder = str(tuned / "one" / name)
    report = evaluate_checkpoint(folder, "toxigen,arc,saferdialogues", str(tmp_path / "eval.json"), limit=6,
                                 batch_size=4, max_new_tokens=6, classifier=default_classifier(True))
    assert {t: report["tasks"][t]["n"] for t in report["tasks"]} == {"toxigen": 6, "arc": 6, "saferdialogues": 6}
    samples = [json.loads(x) for x in open(tmp_path / "eval_samples.jsonl")]
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        for s in (s for s in samples if "logliks" in s):
            for option, got in zip(s["options"], s["logliks"]):
                ctx, cont = encode_pair(tok, s["prompt"], option)
                lp = model(input_ids=torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
                want = float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))
                assert got == pytest.approx(want, rel=1e-5, abs=1e-5), (s["id"], option)
    assert sum("generation" in s for s in samples) == 6

    from chained_tuning.data.tasks import load_task
    examples = load_task("saferdialogues", "test").examples[:8]  # two batches of 4: rows leave as they stop
    prompts = [ctx for ctx, _ in encode_prompts(tok, examples, 6, model.config.max_position_embeddings)]
    stop = turn_stop_ids(tok)
    assert generate_batched(model, tok, prompts, 6, 4, "cpu", stop) == generate_reference(model, tok, prompts, 6,
                                                                                          "cpu", stop)


@pytest.mark.parametrize("name", NAMES)
def test_curvature_cli_runs_and_records_its_paths(tuned, name, tmp_path):
    import curvature
    out = tmp_path / "curv.json"
    assert curvature.main(["--model", str(tuned / "one" / name), "--task", "toxigen", "--samples", "4",
                           "--micro_batch_size", "2", "--max_iter", "8", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["rho"] == max(abs(r["lambda_max"]), abs(r["lambda_min"])) > 0 and r["n_samples"] == 4
    if r["backend"]["cross_entropy"] == "fused_linear_xent":
        assert r["backend"]["last_layer"] == ("answer_rows" if name in ANSWER_ROWS else "full")
    assert r["backend"]["attention"] in ("blocks_fused", "blocks", "model")


def _reference_hvp(model, batches, v):
    """H v by plain double backward through the model's eager attention (none of curvature's paths)."""
    from chained_tuning.hessian.reference import answer_loss_sum_ref
    params = list(model.parameters())
    total = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    loss = sum(answer_loss_sum_ref(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   b["labels"])[0] for b in batches) / total
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return torch.autograd.grad(grads, params, grad_outputs=v)


@pytest.mark.parametrize("name", NAMES)
def test_hvp_fast_paths_match_plain_double_backward(models, name):
    """HessianOperator with every fast path it finds for the family (fused LM head + cross-entropy, the last
    layer at the answer rows, causal attention blocks; layer-wise where the family takes it) against plain
    double backward, float64. Batches of 64 tokens: two attention blocks of 32 rows."""
    from transformers import AutoModelForCausalLM

    from chained_tuning.hessian.layerwise import unsupported
    from chained_tuning.hessian.operator import HessianOperator
    model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float64).eval()
    ref_model = AutoModelForCausalLM.from_pretrained(models[name], dtype=torch.float64,
                                                     attn_implementation="eager").eval()
    batches = [make_batch(2, 64, 1, n_answer=6, vocab=4096), make_batch(1, 40, 2, n_answer=3, vocab=4096)]
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in model.parameters()]
    want = _reference_hvp(ref_model, batches, v)
    scale = max(float(w.abs().max()) for w in want)
    modes = ["auto"] + (["on"] if unsupported(model) is None else [])
    for mode in modes:
        op = HessianOperator(model, batches, fused_ce="auto", gradient_checkpointing=mode)
        if mode == "auto" and op.ce == "linear_xent":
            assert (op.last_rows is not None) == (name in ANSWER_ROWS)
        got = op.hvp(v)
        err = max(float((a - b).abs().max()) for a, b in zip(got, want))
        # HF norms and softmaxes round in float32 even in a float64 model: ~1e-7 relative
        assert err <= 1e-5 * scale, (mode, err, scale)


def test_layerwise_refusal_names_the_family(models, capsys, tmp_path):
    import curvature
    from chained_tuning.hessian.errors import CurvatureError
    from chained_tuning.hessian.operator import HessianOperator
    model = family_model("opt")
    with pytest.raises(CurvatureError, match=r"gradient checkpointing of the HVP: the opt family \(OPTForCausalLM\)"):
        HessianOperator(model, [make_batch(2, 8, 1, vocab=4096)], gradient_checkpointing="on")
    out = tmp_path / "curv.json"
    with pytest.raises(SystemExit) as stop:  # curvature.py's command line, in this process
        curvature.main(["--model", models["gpt2"], "--task", "toxigen", "--samples", "2",
                        "--gradient_checkpointing", "on", "--out", str(out)])
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert stop.value.code == 2 and len(errors) == 1 and "the gpt2 family" in errors[0], err
    assert not out.exists()


@pytest.mark.parametrize("name", ["gpt2", "gpt_neox"])
def test_spectrum_matches_dense_hessian(name):
    """Lanczos (fast paths on where they hold) against the eigenvalues of the dense Hessian of a ~2k-parameter
    float64 model of the family."""
    import curvature as C
    small = {"gpt2": {"n_embd": 8, "n_inner": 16, "n_layer": 1, "n_head": 2, "n_positions": 16},
             "gpt_neox": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                          "max_position_embeddings": 16, "rotary_pct": 0.5}}[name]
    model = family_model(name, seed=1, dtype=torch.float64, vocab_size=48, attn_implementation="eager", **small)
    bs = [make_batch(3, 10, 1), make_batch(2, 8, 2, n_answer=3)]
    dense = dense_hessian(model, bs)
    assert 1000 <= dense["flat"].numel() <= 3000
    for backend in ("torch", "auto"):
        r = C.hessian_spectrum(model, bs, tol=1e-7, max_iter=400, backend=backend, stop="both")
        assert r["converged"]
        for k, d in (("lambda_max", "lmax"), ("lambda_min", "lmin"), ("rho", "rho")):
            assert abs(r[k] - dense[d]) <= 1e-5 * abs(dense[d]), (backend, k)
        assert abs(r["loss"] - dense["loss"]) <= 1e-10 * max(1.0, dense["loss"])
