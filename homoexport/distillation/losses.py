"""The distillation objective of HomoDistil (Liang et al., ICLR 2023) and the related knowledge types (OD, HS, MiniLMv2 relations).

``L = a_mlm·MLM + a_kl·T²·KL(p_t‖p_s) + a_hid·mean_k MSE(H_s^k W_k, H_t^k) + a_att·mean_k MSE(A_s^k, A_t^k)
     + a_emb·MSE(E_s W_e, E_t) + a_rel·MiniLMv2 relation KL``

Hidden and attention terms exclude padding; attention compares kept heads only; MLM logits and KL are
computed on masked positions only (the vocabulary projection is the most expensive matmul of a step).
The projections W_k, W_e start as the identity (the selection matrix of the kept dims, in masked form)
and are trained with the student but never saved with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from homoexport.config.recipe import LossSpec
from homoexport.errors import UsageError
from homoexport.pruning.mask_groups import KeptHeads


@dataclass
class EncoderOutputs:
    """What one forward pass exposes to the losses."""

    hidden: tuple[torch.Tensor, ...]  # L+1 x [B, T, H]: embeddings output, then every layer
    attentions: tuple[torch.Tensor, ...] | None = None  # L x [B, heads, T, T]
    mlm_logits: torch.Tensor | None = None  # [N_masked, V]
    relation_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # Q, K, V [B, T, A] of the relation layer
    sentence: torch.Tensor | None = None  # [B, H] pooled last hidden state, when it was computed beforehand


SENTENCE_TERMS = frozenset({"sentence", "similarity", "contrastive"})  # terms that read only the pooled sentence embedding


def active_terms(spec: LossSpec, has_mlm: bool) -> dict[str, float]:
    """Terms with a non-zero weight that a teacher can provide (no MLM head: no MLM/KL)."""
    w = {"mlm": spec.mlm, "kl": spec.kl, "hidden": spec.hidden, "attention": spec.attention, "embedding": spec.embedding,
         "relation": spec.relation, "sentence": spec.sentence, "similarity": spec.similarity, "contrastive": spec.contrastive}
    if not has_mlm:
        w["mlm"] = w["kl"] = 0.0
    return {k: v for k, v in w.items() if v > 0}


def layer_map(strategy: str, student_layers: int, teacher_layers: int) -> list[tuple[int, list[int]]]:
    """Pairs (student layer, teacher layers averaged as its target), 1-based like ``hidden_states``.

    one_to_one: same depth, layer k to layer k; uniform: k to k·Lt/Ls; uniform_last: uniform but the
    last student layer always to the last teacher layer; uniform_consecutive: k to the mean of its
    consecutive block of Lt/Ls teacher layers; last: only the last layers; last_k: the student's layers
    to the teacher's last Ls layers.
    """
    Ls, Lt = student_layers, teacher_layers
    if strategy == "one_to_one":
        if Ls != Lt:
            raise UsageError(f"layer_mapping one_to_one needs equal depths (student {Ls}, teacher {Lt}); use uniform, last or last_k")
        return [(k, [k]) for k in range(1, Ls + 1)]
    if strategy == "last":
        return [(Ls, [Lt])]
    if strategy == "last_k":
        return [(k, [Lt - Ls + k]) for k in range(1, Ls + 1)]
    if strategy in ("uniform", "uniform_last"):
        pairs = [(k, [max(1, round(k * Lt / Ls))]) for k in range(1, Ls + 1)]
        if strategy == "uniform_last":
            pairs[-1] = (Ls, [Lt])
        return pairs
    if strategy == "uniform_consecutive":
        bounds = [round(i * Lt / Ls) for i in range(Ls + 1)]
        return [(k, list(range(bounds[k - 1] + 1, bounds[k] + 1))) for k in range(1, Ls + 1)]
    raise UsageError(f"unknown layer_mapping {strategy!r}")


def _identity_projection(student_width: int, teacher_width: int) -> nn.Linear:
    """W: student width -> teacher width, identity on the shared dims (selection of kept dims)."""
    proj = nn.Linear(student_width, teacher_width, bias=False)
    with torch.no_grad():
        if student_width == teacher_width:
            proj.weight.copy_(torch.eye(teacher_width))
        else:  # a student of another width (random init) has no kept-dims correspondence
            nn.init.normal_(proj.weight, std=student_width**-0.5)
    return proj


def mean_pool(hidden: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """[B, T, H] token states -> [B, H] mean over valid tokens (the default sentence-transformers pooling)."""
    mask = token_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def pool_hidden(hidden: torch.Tensor, token_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """[B, T, H] token states -> [B, H] sentence embedding, pooled as sentence-transformers' Pooling ``mode`` does:
    ``mean`` or ``max`` over valid tokens, or the first token's state (``cls``)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(token_mask.unsqueeze(-1) == 0, torch.finfo(hidden.dtype).min).amax(1)
    return mean_pool(hidden, token_mask)


def pooled_cosine(student_last: torch.Tensor, teacher_last: torch.Tensor, token_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Mean cosine between the pooled (``pool_hidden`` ``mode``) last hidden states [B, T, H] of student and teacher."""
    s, t = pool_hidden(student_last, token_mask, mode), pool_hidden(teacher_last, token_mask, mode)
    return F.cosine_similarity(s.float(), t.float(), dim=-1).mean()


def similarity_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the [B, B] cosine-similarity matrices of two sets of sentence embeddings [B, Hs], [B, Ht]."""
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    return F.mse_loss(s @ s.T, t @ t.T)


def contrastive_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL from the teacher's to the student's softmax over each row's cosine similarities to the other rows [B, H*].

    The MSE of similarity matrices weighs every pair alike, and in a batch of unrelated sentences almost every pair
    sits near 0; the softmax at a low temperature puts the weight on each sentence's nearest rows instead, the
    ranking that STS and retrieval measure (contrastive distillation, as in the in-batch softmax sentence encoders
    such as all-MiniLM-L6-v2 are trained with, at scale 20, i.e. temperature 0.05).
    """
    s = F.normalize(student.float(), dim=-1)
    t = F.normalize(teacher.float(), dim=-1)
    others = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
    log_s = F.log_softmax((s @ s.T)[others].view(len(s), -1) / temperature, dim=-1)
    log_t = F.log_softmax((t @ t.T)[others].view(len(t), -1) / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean")


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over valid tokens only: [B, T, H] pairs, ``token_mask`` [B, T] of 0/1."""
    err = (student - teacher).pow(2).mean(-1)  # [B, T]
    w = token_mask.to(err.dtype)
    return (err * w).sum() / w.sum().clamp_min(1)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, kept: KeptHeads | None, layer: int, token_mask: torch.Tensor) -> torch.Tensor:
    """MSE of attention probabilities [B, heads, T, T] over the kept heads (``kept`` of ``layer``, all when None) and
    non-padding query rows: the student's kept heads against the teacher heads they were copied from."""
    if kept is not None:
        teacher, student = teacher[:, kept.teacher[layer].to(teacher.device)], student[:, kept.student[layer].to(student.device)]
    if student.shape[1] != teacher.shape[1]:
        raise UsageError("the attention term needs the same head count in student and teacher; use relation transfer instead")
    err = (student - teacher).pow(2).mean(-1)  # [B, h, T]
    w = token_mask[:, None, :].to(err.dtype).expand_as(err)
    return (err * w).sum() / w.sum().clamp_min(1)


def relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int, token_mask: torch.Tensor) -> torch.Tensor:
    """MiniLMv2 self-relation transfer: KL between softmax(X Xᵀ/√d) of re-split relation heads.

    Works for any student width: both sides are split into the same number of relation heads.
    """

    def relations(x: torch.Tensor) -> torch.Tensor:  # [B, T, A] -> log-probs [B, R, T, T]
        B, T, A = x.shape
        if A % heads:
            raise UsageError(f"relation_heads={heads} must divide the projection width {A}")
        x = x.view(B, T, heads, A // heads).transpose(1, 2)
        scores = x @ x.transpose(-1, -2) / (A // heads) ** 0.5
        scores = scores.masked_fill(token_mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
        return F.log_softmax(scores.float(), dim=-1)

    log_s, log_t = relations(student), relations(teacher)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [B, R, T]
    w = token_mask[:, None, :].to(kl.dtype).expand_as(kl)
    return (kl * w).sum() / w.sum().clamp_min(1)


class DistillationLoss(nn.Module):
    """The weighted sum of loss terms; owns the learnable projections W_k and W_e.

    ``pooling``: how the sentence-level terms pool token states into the sentence embedding, the teacher's own
    (``homoexport.evaluation.sts.read_pooling``), so that the student learns the embedding its users will read.
    """

    def __init__(self, spec: LossSpec, student_hidden: int, teacher_hidden: int, student_layers: int, teacher_layers: int, has_mlm: bool,
                 pooling: str = "mean"):
        super().__init__()
        self.spec = spec
        self.has_mlm = has_mlm
        self.pooling = pooling
        self.pairs = layer_map(spec.layer_mapping, student_layers, teacher_layers)
        self.hidden_proj = nn.ModuleList(_identity_projection(student_hidden, teacher_hidden) for _ in self.pairs)
        self.embedding_proj = _identity_projection(student_hidden, teacher_hidden)

    @torch.no_grad()
    def keep_student_dims(self, kept: torch.Tensor) -> None:
        """Narrow every projection's input to the kept hidden dims (the student was materialised)."""
        for proj in [*self.hidden_proj, self.embedding_proj]:
            proj.weight = nn.Parameter(proj.weight[:, kept.to(proj.weight.device)].contiguous())
            proj.in_features = int(kept.numel())

    @property
    def sentence_only(self) -> bool:
        """True when every weighed term reads only the pooled sentence embeddings."""
        return set(self.active_terms) <= SENTENCE_TERMS

    @property
    def uses_mlm(self) -> bool:
        """True when the student sees MLM-corrupted inputs: the teacher has an MLM head and MLM or KL is weighed."""
        return self.has_mlm and bool({"mlm", "kl"} & set(self.active_terms))

    @property
    def active_terms(self) -> dict[str, float]:
        """Terms with a non-zero weight that this teacher can provide (no MLM head: no MLM/KL)."""
        return active_terms(self.spec, self.has_mlm)

    def forward(
        self, student: EncoderOutputs, teacher: EncoderOutputs, token_mask: torch.Tensor,
        mlm_labels: torch.Tensor | None, kept_heads: KeptHeads | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and each unweighted term. ``kept_heads``: the student's heads among the teacher's (a pruned student)."""
        terms: dict[str, torch.Tensor] = {}
        active = self.active_terms
        if "mlm" in active:
            terms["mlm"] = F.cross_entropy(student.mlm_logits.float(), mlm_labels)
        if "kl" in active:
            T = self.spec.temperature
            log_s = F.log_softmax(student.mlm_logits.float() / T, -1)
            log_t = F.log_softmax(teacher.mlm_logits.float() / T, -1)
            terms["kl"] = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * T * T
        if "hidden" in active:
            per_layer = []
            for (k, targets), proj in zip(self.pairs, self.hidden_proj):
                target = torch.stack([teacher.hidden[j] for j in targets]).mean(0)
                per_layer.append(masked_mse(proj(student.hidden[k]), target, token_mask))
            terms["hidden"] = torch.stack(per_layer).mean()
        if "embedding" in active:
            terms["embedding"] = masked_mse(self.embedding_proj(student.hidden[0]), teacher.hidden[0], token_mask)
        if "attention" in active:
            per_layer = [attention_mse(student.attentions[k - 1], teacher.attentions[targets[-1] - 1], kept_heads, k - 1, token_mask)
                         for k, targets in self.pairs]
            terms["attention"] = torch.stack(per_layer).mean()
        if SENTENCE_TERMS & set(active):
            s_sent = student.sentence if student.sentence is not None else pool_hidden(student.hidden[-1], token_mask, self.pooling)
            t_sent = teacher.sentence if teacher.sentence is not None else pool_hidden(teacher.hidden[-1], token_mask, self.pooling)
            if "sentence" in active:
                terms["sentence"] = F.mse_loss(self.hidden_proj[-1](s_sent).float(), t_sent.float())
            if "similarity" in active:
                terms["similarity"] = similarity_mse(s_sent, t_sent)
            if "contrastive" in active:
                terms["contrastive"] = contrastive_kl(s_sent, t_sent, self.spec.contrastive_temperature)
        if "relation" in active:
            rel = [relation_kl(s, t, self.spec.relation_heads, token_mask) for s, t in zip(student.relation_qkv, teacher.relation_qkv)]
            terms["relation"] = torch.stack(rel).mean()
        total = sum(active[k] * v for k, v in terms.items())
        return total, terms
