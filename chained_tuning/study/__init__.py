"""The study as a graph of stages (study.py runs it): profiles.py the profile table and every variable,
graph.py the stages, executors.py the local pool and Slurm, plan.py the dry-run plan and the status,
cost_model.py the cost figures, stage_check.py whether an existing output was made with the settings asked for."""
