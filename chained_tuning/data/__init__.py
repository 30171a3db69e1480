"""The tasks: a module per task, their registry, the rules they share, the synthetic stand-ins, the tiny base.

    registry.py     the one place tasks are listed (TASKS, in order; register() adds a module kept elsewhere)
    arc.py, csqa.py, csqa2.py, toxigen.py, bbq.py, saferdialogues.py   a task each: loader, prompt, groups, splits
    tasks.py        load_task (read, split, sample), TaskData, encode_pair, the data options; re-exports the rest
    readers.py      reading the release files: a missing file or a bad row named
    splits.py       seeded splits for releases without one, the stratified training sample
    synthetic.py    the record type, the paper's templates, the synthetic stand-ins, the tiny base's text
    tiny_base.py    the embedded tiny model: python -m chained_tuning.data.tiny_base

This file imports nothing: importing tiny_base.py runs it first, and the tiny base needs only synthetic.py
(tests/test_layout.py), so the registry is registry.py rather than this namespace. Docs: docs/data.md;
docs/adding.md (a new task: its module here and a line in registry.BUILTIN).
"""
