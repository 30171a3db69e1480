"""Run under torchrun by tests/test_distributed.py: records every weight file each process opens, then either
runs a script as its command line would (`driver.py SCRIPT ARGS...`) or a list of finetune.train_stage configs
(`driver.py --stages CONFIGS.json`) in one process group, as replay.py holds one across its points; an entry
{"script": [SCRIPT, ARGS...]} in that list runs a script's command line there."""
import json
import os
import runpy
import sys

import safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_open = safetensors.safe_open


def _logged_open(path, *args, **kwargs):
    # before transformers imports safe_open: every checkpoint read of this process passes here
    with open(os.environ["OPENS_LOG"] + f".rank{os.environ['RANK']}", "a") as f:
        f.write(os.path.abspath(str(path)) + "\n")
    return _open(path, *args, **kwargs)


safetensors.safe_open = _logged_open

if sys.argv[1] == "--stages":
    import torch

    import finetune
    from chained_tuning.common import setup_process_group
    setup_process_group(torch.device("cpu"))
    for cfg in json.load(open(sys.argv[2])):
        if "script" in cfg:  # a script's command line in the same launch (evaluate.py ends the group: last)
            script = os.path.join(ROOT, cfg["script"][0])
            sys.argv = [script, *cfg["script"][1:]]
            runpy.run_path(script, run_name="__main__")
            continue
        finetune.train_stage(cfg)
else:
    script = os.path.join(ROOT, sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")
