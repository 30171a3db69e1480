"""The registry of tasks: one module per task, in the order of TASKS (which is the order the tiny base's tokenizer
reads the synthetic stand-ins; tests/test_tasks.py pins it).

A task module holds (copy arc.py for multiple choice, toxigen.py for a task with groups, saferdialogues.py for a
generative one; docs/adding.md):
    NAME          the name every --task, --tasks and study variable uses
    KIND          "capability" or "safety"
    GENERATIVE    True where the answer is generated (scored by the classifier), not chosen
    load(data_dir, **data_options) -> ({split: [Example]}, info)   the original release files under data_dir;
                  splits "train", "validation", "test" (official), "train" and "test" (validation = a seeded 10%
                  of train), or "all" (a seeded split); data_options are load_task's (arc_choices, test_set, cells)
    synthetic() -> the same, for the synthetic stand-in (no data_dir)
A new task: its module in this folder plus one line in BUILTIN below, or register(module) at run time for a module
kept elsewhere (tests/test_add_task.py adds one from a fixture folder that way).
"""
from . import arc, bbq, csqa, csqa2, saferdialogues, toxigen

TASK_MODULES = {}  # name -> module
TASKS = []
CAPABILITY_TASKS = []
SAFETY_TASKS = []
GENERATIVE_TASKS = []
LOADERS = {}  # name -> module.load: load(data_dir) reads the release files


def register(module):
    """Add a task module; the lists above grow in place, so every `from ... import TASKS` sees the task."""
    if module.NAME in TASK_MODULES:
        raise ValueError(f"task {module.NAME!r} is registered already")
    if module.KIND not in ("capability", "safety"):
        raise ValueError(f"task {module.NAME!r}: KIND {module.KIND!r} is not 'capability' or 'safety'")
    TASK_MODULES[module.NAME] = module
    TASKS.append(module.NAME)
    (CAPABILITY_TASKS if module.KIND == "capability" else SAFETY_TASKS).append(module.NAME)
    if module.GENERATIVE:
        GENERATIVE_TASKS.append(module.NAME)
    LOADERS[module.NAME] = module.load
    return module


BUILTIN = (arc, csqa, csqa2, toxigen, bbq, saferdialogues)  # in TASKS order
for _module in BUILTIN:
    register(_module)
