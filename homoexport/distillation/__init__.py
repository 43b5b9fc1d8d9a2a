"""Distillation loops: task-agnostic HomoDistil on text, and task-specific HomoDistil on labelled data."""
