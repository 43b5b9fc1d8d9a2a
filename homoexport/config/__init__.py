"""Recipes: the validated YAML that fully describes a run."""
