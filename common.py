"""Small helpers every script shares: the user-facing error type, atomic writes, run metadata,
seeding, and loading a checkpoint (or the embedded tiny base) with checks that name the fix.

    from common import load_model_and_tokenizer, write_json_atomic, UserError
    model, tok = load_model_and_tokenizer("tiny")          # the cached tiny Llama base
    model, tok = load_model_and_tokenizer("runs/tiny/stage1/arc/lr0.001/seed0")
"""
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

import numpy as np

META_FILE = "chained_tuning.json"  # lineage written into every checkpoint this toolkit saves


class UserError(Exception):
    """Bad input from the user: scripts print the message (no traceback) and exit 2."""


def die_on_user_error(main):
    """Run main(); turn a UserError into one `error:` line and exit code 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def write_json_atomic(path, obj):
    """Write JSON to a temporary name beside `path`, then rename: readers never see half a file."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final_dir, overwrite=False):
    """Yield a temporary folder beside `final_dir`; rename it into place only if the block succeeds.

    A crashed or interrupted run leaves no `final_dir`, so "the folder exists" means "the stage is
    complete" (run_all.sh relies on that to resume)."""
    final_dir = os.path.abspath(final_dir)
    if os.path.exists(final_dir) and not overwrite:
        raise UserError(f"{final_dir} already exists; pass --overwrite to replace it or choose another --out")
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".tmp-{os.path.basename(final_dir)}-")
    try:
        yield tmp
        if os.path.exists(final_dir):
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def seed_everything(seed):
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata():
    import torch
    import transformers
    return {"versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__, "numpy": np.__version__},
            "git_commit": git_commit()}


def read_meta(model_dir):
    """The lineage file of a checkpoint this toolkit saved, or {} for any other checkpoint."""
    p = os.path.join(model_dir, META_FILE)
    if os.path.isfile(p):
        with open(p) as f:
            return json.load(f)
    return {}


def resolve_model_path(path):
    """'tiny' -> the cached tiny base (built on first use); a folder -> itself after a sanity check."""
    if path == "tiny":
        from tiny_base import ensure_tiny_base
        return ensure_tiny_base()
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"{path} is not a model checkpoint (no config.json in it); pass a folder written "
                            f"by finetune.py or save_pretrained, a hub name, or 'tiny'")
        return path
    if os.path.exists(path):
        raise UserError(f"{path} is a file, not a checkpoint folder; pass the folder that holds config.json")
    if path.count("/") == 1 and not path.startswith((".", "/")):
        return path  # looks like a hub id ("meta-llama/Llama-2-7b-hf"): from_pretrained decides
    raise UserError(f"model {path} not found; pass a checkpoint folder, a hub name, or 'tiny'")


def load_model_and_tokenizer(path, dtype=None, attn_implementation=None):
    """Load a causal LM and its tokenizer (safetensors only) and check that they belong together."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per loaded checkpoint drowns the run's own output
    resolved = resolve_model_path(path)
    kw = {"use_safetensors": True, "dtype": dtype or torch.float32}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        raise UserError(f"could not load a tokenizer from {resolved} ({type(e).__name__}: {e}); the checkpoint "
                        f"folder must hold the tokenizer files saved with the model") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved, **kw)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"could not load a causal LM from {resolved} ({type(e).__name__}: {e}); pass a "
                        f"checkpoint saved with safetensors (model.safetensors) and its config.json") from None
    check_tokenizer_matches(model, tok, resolved)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # Llama-2 ships without a pad token; pads are masked anyway
    return model, tok


def check_tokenizer_matches(model, tok, where):
    n_emb = model.get_input_embeddings().weight.shape[0]
    ids = [i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None]
    if len(tok) > n_emb or any(i >= n_emb for i in ids):
        raise UserError(f"the tokenizer in {where} has {len(tok)} tokens but the model's embedding has {n_emb} "
                        f"rows: they do not belong together; save the model with its own tokenizer")
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer in {where} has no EOS token; the answer targets end with EOS")
