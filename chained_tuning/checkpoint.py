"""Checkpoints: resolving a --model value (a folder, a hub id, or "tiny"), loading a causal LM and its tokenizer
through from_pretrained (safetensors only), and the lineage file every checkpoint of this toolkit carries."""
import json
import os
import re

from .common import UserError, read_json
from .data.tiny_base import ensure_tiny_base
from .study import cost_model

META_FILE = "chained_tuning.json"  # lineage written into every checkpoint this toolkit saves


def read_meta(model_dir):
    """The lineage file of a checkpoint this toolkit saved, or {} for any other checkpoint (a hub id too)."""
    p = os.path.join(model_dir, META_FILE)
    return read_json(p) if os.path.isfile(p) else {}


def write_meta(model_dir, lineage):
    """The lineage file read_meta reads, into a checkpoint folder being written (an atomic_dir)."""
    with open(os.path.join(model_dir, META_FILE), "w") as f:
        json.dump(lineage, f, indent=2)


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # org/name


HUB_PROBE_S = 5.0  # how long a hub id waits to learn the hub cannot be reached (the hub client retries ~50 s)


def resolve_model_path(path, flag="--model"):
    """'tiny' -> the cached tiny base (built on first use); a folder -> itself after a sanity check; a hub id
    (org/name, and nothing local by its first part) -> itself, or its cached snapshot when the hub is out of
    reach. Anything else, a mistyped local path above all, fails here at once, naming it."""
    if path == "tiny":
        return ensure_tiny_base()
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        if not os.path.isfile(os.path.join(local, "config.json")):
            raise UserError(f"{path} is not a model checkpoint (no config.json in it); pass a folder written "
                            f"by finetune.py or save_pretrained, a hub id (org/name), or 'tiny'")
        return local
    if os.path.exists(local):
        raise UserError(f"{path} is a file, not a checkpoint folder; pass the folder that holds config.json")
    first = path.split("/")[0]
    if path.startswith(("/", "./", "../", "~")) or path.endswith("/") or not HUB_ID.fullmatch(path):
        raise UserError(f"{flag} {path}: model not found (no such folder); pass a checkpoint folder, a hub id "
                        f"(org/name), or 'tiny'")
    if os.path.isdir(first):
        raise UserError(f"{flag} {path}: model not found (no such folder; {first}/ exists here, so it is read as a "
                        f"local path, not a hub id); pass a checkpoint folder, a hub id (org/name), or 'tiny'")
    return _hub_model(path, flag)


def _hub_offline():
    return any(os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_cached(repo_id):
    """The folder of repo_id's cached snapshot (config.json in the local hub cache), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - no client or an odd cache: treated as not cached
        return None
    return os.path.dirname(hit) if isinstance(hit, str) else None


def _hub_reachable(timeout=HUB_PROBE_S):
    """Whether a TCP connection to the hub opens within `timeout` (name lookup included, in a thread since
    getaddrinfo takes no timeout). Behind a proxy the hub client's own path is trusted."""
    import socket
    import threading
    import urllib.parse
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    ok = []

    def probe():
        try:
            socket.create_connection((url.hostname, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def _hub_model(repo_id, flag):
    cached = _hub_cached(repo_id)
    if _hub_offline():
        if cached:
            return repo_id  # the hub client reads its cache in offline mode
        raise UserError(f"{flag} {repo_id}: no such local folder, and as a hub id it is not in the local hub cache "
                        f"while HF_HUB_OFFLINE is set; pass a local checkpoint folder, or download it first")
    if _hub_reachable():
        return repo_id
    if cached:
        return cached
    raise UserError(f"{flag} {repo_id}: no such local folder, and the hub cannot be reached to download it as a hub "
                    f"id (no network?); pass a local checkpoint folder")


def load_model_and_tokenizer(path, dtype=None, attn_implementation=None):
    """Load a causal LM and its tokenizer (safetensors only) and check that they belong together."""
    resolved = resolve_model_path(path)
    tok = load_tokenizer(resolved)
    model = load_model(resolved, dtype, attn_implementation)
    check_tokenizer_matches(model, tok, resolved)
    return model, tok


def load_model(resolved, dtype=None, attn_implementation=None):
    """The causal LM of a resolved checkpoint folder or hub id (safetensors only), float32 unless dtype."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per loaded checkpoint drowns the run's own output
    kw = {"use_safetensors": True, "dtype": dtype or torch.float32}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    try:
        return AutoModelForCausalLM.from_pretrained(resolved, **kw)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        raise UserError(f"could not load a causal LM from {resolved} ({type(e).__name__}: {e}); pass a "
                        f"checkpoint saved with safetensors (model.safetensors) and its config.json") from None


def load_tokenizer(resolved):
    """The tokenizer saved with a checkpoint (a resolved folder or hub id), with a pad token."""
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(resolved)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message
        raise UserError(f"could not load a tokenizer from {resolved} ({type(e).__name__}: {e}); the checkpoint "
                        f"folder must hold the tokenizer files saved with the model") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # Llama-2 ships without a pad token; pads are masked anyway
    return tok


def tokenizer_dir(path, flag="--tokenizer"):
    """A folder holding a tokenizer.json that loads (a checkpoint folder such as Llama-2-7b-hf's will do)."""
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path}: no such folder; pass the folder that holds the tokenizer's "
                        f"tokenizer.json (a model checkpoint folder will do)")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise UserError(f"{flag} {path}: no tokenizer.json in it; pass the folder that holds the tokenizer's "
                        f"tokenizer.json (a model checkpoint folder will do)")
    try:
        cost_model.token_counter(os.path.join(path, "tokenizer.json"))
    except ValueError as e:
        raise UserError(f"{flag} {path}: {e}; pass the folder of a tokenizer saved with save_pretrained") from None
    return path


def check_tokenizer_matches(model, tok, where):
    n_emb = model.get_input_embeddings().weight.shape[0]
    ids = [i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None]
    if len(tok) > n_emb or any(i >= n_emb for i in ids):
        raise UserError(f"the tokenizer in {where} has {len(tok)} tokens but the model's embedding has {n_emb} "
                        f"rows: they do not belong together; save the model with its own tokenizer")
    if tok.eos_token_id is None:
        raise UserError(f"the tokenizer in {where} has no EOS token; the answer targets end with EOS")
