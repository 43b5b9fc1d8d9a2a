"""Structured width pruning of BERT-class encoders: mask groups, importance, schedule, materialisation,
and :class:`HomoDistilPruner`, which ties them together for any training loop."""
