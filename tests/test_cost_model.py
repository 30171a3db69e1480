"""cost_model.py's formulas against numbers worked out by hand from Llama-2-7B's shape and the stated GPU.

    python -m pytest -q tests/test_cost_model.py
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from chained_tuning.study import cost_model as cm  # noqa: E402

N7B = 6_738_415_616  # Llama-2-7b-hf's parameter count, as its model card and safetensors index give it


def test_parameter_count_of_llama2_7b_by_hand():
    # per layer: q, k, v, o 4 * 4096^2 = 67,108,864; MLP 3 * 4096 * 11008 = 135,266,304; norms 2 * 4096
    assert cm.params_per_layer() == 67_108_864 + 135_266_304 + 8_192 == 202_383_360
    # embedding and head 2 * 32000 * 4096, final norm 4096
    assert cm.root_params() == 262_144_000 + 4_096
    assert cm.n_params() == 32 * 202_383_360 + 262_148_096 == N7B


def test_parameter_count_matches_the_meta_device_model():
    pytest.importorskip("transformers")
    assert cm.n_params_meta() == N7B


def test_shape_from_a_config_json(tmp_path):
    cfg = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "torch_dtype": "float16", "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    shape = cm.shape_from_config(str(tmp_path))
    assert cm.n_params(shape) == N7B
    # grouped-query attention (8 kv heads): k and v are a quarter as wide
    gqa = dict(shape, kv_heads=8)
    assert cm.params_per_layer(gqa) == 2 * 4096 ** 2 + 2 * 4096 * 1024 + 3 * 4096 * 11008 + 2 * 4096


def test_checkpoint_bytes():
    assert cm.checkpoint_bytes(N7B, "bf16") == 2 * N7B == 13_476_831_232
    assert cm.checkpoint_bytes(N7B, "float32") == 26_953_662_464
    with pytest.raises(ValueError, match="int8"):
        cm.checkpoint_bytes(N7B, "int8")


def test_fsdp_adamw_memory_on_8_gpus_by_hand():
    tokens, bpt = 1000, 100_000
    b = cm.train_memory_breakdown(N7B, 8, tokens, 32, 4096, bpt, checkpointing=False)
    # fp32 master + fp32 grad + AdamW m and v: 16 bytes a parameter, over 8 GPUs
    assert b["sharded_states"] == 16 * N7B / 8 == 13_476_831_232
    # two layers gathered: bf16 params (2) + bf16 grads (2) + fp32 grads (4); embedding/head/norm in bf16
    assert b["gathered_params_grads"] == pytest.approx(2 * 202_383_360 * 8 + 262_148_096 * 2, abs=1)
    assert b["activations"] == 1000 * 32 * 100_000
    assert b["logits"] == 1000 * 32000 * 10
    tensors = 13_476_831_232 + 3_762_429_952 + 3_200_000_000 + 320_000_000
    assert b["total"] == pytest.approx(tensors * 1.1 + 2.5e9, rel=1e-12)
    assert cm.train_memory_per_gpu(N7B, 8, tokens, 32, 4096, bpt, False) == b["total"]
    # checkpointing keeps one bf16 hidden vector a layer plus one layer's activations (its recompute)
    c = cm.train_memory_breakdown(N7B, 8, tokens, 32, 4096, bpt, checkpointing=True)
    assert c["activations"] == 1000 * (32 * 2 * 4096 + 100_000)
    # one GPU: the 16 bytes a parameter alone are 108 GB, the out-of-memory figure
    one = cm.train_memory_breakdown(N7B, 1, tokens, 32, 4096, bpt, False)
    assert one["sharded_states"] / 1e9 == pytest.approx(107.8, abs=0.1)
    assert not cm.fits(one["total"], "A100-80GB") and cm.fits(b["total"], "A100-80GB")


def test_eval_memory_by_hand():
    got = cm.eval_memory_per_gpu(N7B, 2048, 32, 4096, kv_cache=True)
    weights = 2 * N7B
    kv = 2048 * 32 * 2 * 4096 * 2
    transient = 2048 * (2 * 4096 + 2 * 11008) * 2
    logits = 2048 * 32000 * 4
    assert got == pytest.approx((weights + kv + transient + logits) * 1.1 + 2.5e9, rel=1e-12)


def test_stage_seconds_by_hand_on_a100():
    peak = 312e12 * 0.40 * 8                       # 8 GPUs at 40% of the bf16 peak, FLOP/s
    attn = 2 * 32 * 4096 * 512                     # attention FLOPs a token, forward, at 512 tokens
    train = 1e6 * (6 * N7B + 3 * attn) / peak      # wall seconds of 1M training tokens
    # FSDP traffic: 122 steps of 16 x 512 tokens, 7/8 of 8 bytes a parameter each, at 200 GB/s: less than compute
    comm = 1e6 / (16 * 512) * 7 / 8 * 8 * N7B / 200e9
    assert comm < train
    assert cm.stage_gpu_seconds("train", 1e6, N7B, 8) == pytest.approx(8 * train, rel=1e-12)
    assert cm.stage_gpu_seconds("eval_forward", 1e6, N7B, 8) == pytest.approx(8 * 1e6 * (2 * N7B + attn) / peak,
                                                                              rel=1e-12)
    assert cm.stage_gpu_seconds("hvp", 1e6, N7B, 8) == pytest.approx(4 * 8 * train, rel=1e-12)
    # decode: 100 steps of 16 sequences, each reading 13.48 GB of bf16 weights at 70% of 2.039 TB/s
    per_step = 2 * N7B / (2.039e12 * 0.70)
    assert cm.stage_gpu_seconds("generate", 1600, N7B, 8, batch=16) == pytest.approx(100 * per_step, rel=1e-12)
    with pytest.raises(ValueError, match="train"):
        cm.stage_gpu_seconds("sample", 1, N7B, 8)


def test_small_steps_are_bound_by_fsdp_traffic():
    # 16 x 100 tokens a step: the per-step collectives (47 GB a GPU at 200 GB/s) outlast the compute
    tokens = 100 * 16 * 100
    comm = 100 * 7 / 8 * 8 * N7B / 200e9
    assert cm.stage_gpu_seconds("train", tokens, N7B, 8, seq_len=100, batch=16) == pytest.approx(8 * comm, rel=1e-12)


def test_assumptions_name_the_gpu_and_the_measured_constants():
    text = "\n".join(cm.ASSUMPTIONS)
    assert "A100-80GB" in text and "312" in text and "MFU 40%" in text
    assert str(cm.ACT_BYTES_PER_TOKEN_LAYER) in text and "bench_scale.py" in text
    assert cm.estimate_tokens("abcdefghi") == 3 and cm.estimate_tokens("") == 1


def test_token_counter_counts_with_a_tokenizer_json_else_estimates(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    count, how = cm.token_counter()
    assert count(["abcdefg", "abcdefgh", ""]) == [2, 3, 1] and "3.5 characters a token" in how
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    count, how = cm.token_counter(str(tmp_path / "tokenizer.json"))
    assert count(["a b a", "b", "a b c d e"]) == [3, 1, 5] and "counted with" in how


def test_tokenizer_flag_of_the_scale_bench_is_checked_before_any_work(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_scale.py"), "--no_measure", "--tokenizer",
                        str(tmp_path)], capture_output=True, text=True)
    assert p.returncode != 0 and "--tokenizer" in p.stderr and "no tokenizer.json" in p.stderr
    assert p.stdout == ""
    (tmp_path / "tokenizer.json").write_text("{}")  # there, but not a tokenizers file: named, no traceback
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_scale.py"), "--no_measure", "--tokenizer",
                        str(tmp_path)], capture_output=True, text=True)
    assert p.returncode != 0 and "is not a tokenizers file" in p.stderr and "Traceback" not in p.stderr
    with pytest.raises(ValueError, match="is not a tokenizers file"):
        cm.token_counter(str(tmp_path / "tokenizer.json"))


def test_import_does_not_import_torch():
    code = "import sys; from chained_tuning.study import cost_model; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_lora_parameter_count_equals_peft_on_a_tiny_llama():
    """lora_params by the projection shapes = what peft itself creates (grouped-query attention included)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {"hidden": 64, "intermediate": 96, "layers": 2, "heads": 8, "kv_heads": 2, "vocab": 128, "tied": False}
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    targets = cm.LORA_ONE_GPU["targets"]
    model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, target_modules=list(targets)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert cm.lora_params(shape, 4, targets) == trainable
    assert cm.n_params(shape) == sum(p.numel() for p in model.parameters()) - trainable
    with pytest.raises(ValueError, match="qkv_proj"):
        cm.lora_params(shape, 4, ("qkv_proj",))


def test_lora_memory_by_hand():
    """Llama-2-7B, r 16 on the 7 projections: 39,976,960 adapter parameters (32 layers x 16 x (4 x 8192 +
    3 x 15104)); one GPU, 2,048 tokens, no checkpointing: bf16 base + 16 B an adapter parameter + measured
    activations + logits, x1.1 + 2.5 GB."""
    n_lora = 32 * 16 * (4 * 8192 + 3 * (4096 + 11008))
    assert cm.lora_params() == n_lora == 39_976_960
    m = cm.lora_one_gpu_memory(cm.LLAMA2_7B, 2048, checkpointing=False)
    acts = 2048 * 32 * cm.ACT_BYTES_PER_TOKEN_LAYER_LORA
    tensors = 2 * cm.n_params() + 16 * n_lora + acts + 2048 * 32000 * cm.LOGIT_BYTES_PER_VOCAB
    assert m["total"] == pytest.approx(tensors * 1.1 + 2.5e9)
    ck = cm.lora_one_gpu_memory(cm.LLAMA2_7B, 2048, checkpointing=True)
    assert ck["activations"] == 2048 * (32 * 8192 + cm.ACT_BYTES_PER_TOKEN_LAYER_LORA)


def test_a_4bit_base_quantises_only_the_layers_linear_weights():
    sh = cm.LLAMA2_7B
    linear = 32 * (cm.params_per_layer(sh) - 2 * 4096)
    rest = cm.n_params(sh) - linear
    assert cm.base_weight_bytes(sh, "nf4") == pytest.approx(linear * 4.127 / 8 + 2 * rest)
    assert cm.base_weight_bytes(sh, "bf16") == 2 * cm.n_params(sh)


def test_lora_fit_halves_the_micro_batch_until_it_fits():
    """Llama-3-8B's bf16 base alone (16 GB + context) does not fit under 85% of 24 GB; Llama-2-7B does at a
    smaller micro-batch with checkpointing; on 80 GB the whole batch fits."""
    assert cm.lora_fit(cm.LLAMA3_8B, 245, "RTX4090-24GB") is None
    micro, ckpt, total = cm.lora_fit(cm.LLAMA2_7B, 245, "RTX4090-24GB")
    assert ckpt and micro < 16 and cm.fits(total, "RTX4090-24GB")
    assert not cm.fits(cm.lora_one_gpu_memory(cm.LLAMA2_7B, 2 * micro * 245, True)["total"], "RTX4090-24GB")
    assert cm.lora_fit(cm.LLAMA2_7B, 245, "A100-80GB")[0] == 16
