"""The study as a graph of stages: settings, plan, cost model, stage checks."""
