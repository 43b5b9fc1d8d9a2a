"""Tiny random BERTs, tokenizers and synthetic text for fast tests (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertModel, BertTokenizerFast

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "a", "an", "cat", "dog", "bird", "sat", "ran", "flew", "on", "in", "under", "mat", "tree", "house",
    "big", "small", "red", "blue", "green", "happy", "sad", "good", "bad", "very", "not", "and", "or", "but",
    "movie", "film", "plot", "actor", "great", "terrible", "boring", "fun", "loved", "hated", "it", "was", "is",
    "of", "to", "with", "this", "that", "river", "city", "music", "book", "read", "wrote", "song", "sang",
]


def make_tokenizer(directory: str | Path) -> BertTokenizerFast:
    """A WordPiece tokenizer over SPECIALS + WORDS + single letters, saved to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = SPECIALS + WORDS + [c for c in letters if c not in WORDS] + [f"##{c}" for c in letters] + [".", ",", "!", "?"]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(directory)
    return tok


def tiny_config(vocab_size: int = 128, hidden: int = 64, heads: int = 4, ffn: int = 128, layers: int = 2, **kw) -> BertConfig:
    """A 2-layer BERT config small enough to run hundreds of forwards per second on one core."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        max_position_embeddings=128,
        type_vocab_size=2,
        **kw,
    )


def make_model(kind: str = "mlm", seed: int = 0, **config_kw) -> torch.nn.Module:
    """A randomly initialised tiny BERT: ``kind`` in {"base", "mlm", "cls"}.

    Biases and LayerNorm parameters are randomised too, so tests catch a forgotten bias or LN slice.
    """
    torch.manual_seed(seed)
    config = tiny_config(**config_kw)
    cls = {"base": BertModel, "mlm": BertForMaskedLM, "cls": BertForSequenceClassification}[kind]
    if kind == "cls":
        config.num_labels = config_kw.get("num_labels", 3)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def save_model_dir(directory: str | Path, kind: str = "mlm", seed: int = 0, **config_kw) -> Path:
    """Save a tiny model together with a matching tokenizer, as a user's model directory would look."""
    directory = Path(directory)
    tok = make_tokenizer(directory)
    model = make_model(kind, seed=seed, vocab_size=len(tok), **config_kw)
    model.save_pretrained(directory)
    return directory


def synthetic_sentences(n: int, seed: int = 0, min_words: int = 4, max_words: int = 20) -> list[str]:
    """Deterministic random sentences over WORDS."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) + "." for _ in range(n)]


def random_batch(vocab_size: int, batch: int = 3, seq: int = 16, seed: int = 0, pad_last: int = 4) -> dict[str, torch.Tensor]:
    """Random ids with padding at the end of the last example (so padding paths are exercised)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, vocab_size, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        attention_mask[-1, -pad_last:] = 0
        input_ids[-1, -pad_last:] = 0
    token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
    token_type_ids[:, seq // 2 :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def torchrun_distill(recipe_path: Path, port: int, processes: int = 2) -> None:
    """Run `homoexport distill RECIPE` under torchrun with ``processes`` CPU processes (gloo; one thread each)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(port),
           "-m", "homoexport", "distill", str(recipe_path), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def max_weight_difference(student_a: Path, student_b: Path) -> float:
    """Largest absolute difference between two saved students' weights (same architecture)."""
    from safetensors.torch import load_file

    a, b = load_file(student_a / "model.safetensors"), load_file(student_b / "model.safetensors")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def linear_output_dtypes(monkeypatch) -> set:
    """The dtypes every ``nn.Linear`` returns from now on: autocast changes them, not the weights."""
    import torch

    seen: set = set()
    original = torch.nn.Linear.forward

    def spy(self, x):
        out = original(self, x)
        seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Linear, "forward", spy)
    return seen
