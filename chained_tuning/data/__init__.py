"""The tasks: loaders, prompts, groups and splits; the synthetic stand-ins; the tiny base."""
