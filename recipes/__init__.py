"""Training recipes, one per stage, each a few hooks on the one loop in core/trainer.py; run by the root scripts."""
