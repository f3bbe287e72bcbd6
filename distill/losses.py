"""Knowledge-distillation losses (plain torch; no DeepSpeed, no torch.distributed).

    loss = alpha * T^2 * KL(p_T || q_T) + (1 - alpha) * CE(labels) [+ hidden_weight * MSE(W h_s, h_t)]

p_T = softmax(teacher_logits / T) (or given teacher probabilities, e.g. the perturbed p^ of
counterfactual role reversal, already at temperature T), q_T = softmax(student_logits / T). The T^2
factor keeps the KD gradient's scale independent of T (Hinton et al., 2015). KL and CE are means over
target tokens, i.e. positions whose label is not `ignore_index` (-100): padding contributes nothing.
Shapes: logits [batch, target_len, vocab], labels [batch, target_len].
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclasses.dataclass
class KDLossOutput:
    total: torch.Tensor
    """alpha * T^2 * kd + (1 - alpha) * ce (scalar, differentiable w.r.t. the student)."""
    kd: torch.Tensor
    """Mean over target tokens of KL(p_T || q_T), without the T^2 and alpha factors."""
    ce: torch.Tensor
    """Mean over target tokens of the student's cross-entropy against the labels (temperature 1)."""
    num_tokens: int
    """Target tokens the means run over."""


def teacher_probs(teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """p_T = softmax(logits / T) in float32, detached from any graph."""
    return torch.softmax(teacher_logits.detach().float() / temperature, dim=-1)


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_probs_T: torch.Tensor | None = None,
    alpha: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
) -> KDLossOutput:
    """The KD + CE loss over target tokens; give exactly one of teacher_logits or teacher_probs_T.

    Teacher inputs are detached: gradients reach the student only.
    """
    if (teacher_logits is None) == (teacher_probs_T is None):
        raise ValueError("give exactly one of teacher_logits or teacher_probs_T")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p = teacher_probs(teacher_logits, temperature) if teacher_logits is not None else teacher_probs_T.detach().float()
    if p.shape != student_logits.shape:
        raise ValueError(
            f"teacher distribution {tuple(p.shape)} and student logits {tuple(student_logits.shape)} differ; "
            "the student must share the teacher's tokenizer and padded vocabulary"
        )
    mask = labels != ignore_index  # [B, T]
    num_tokens = int(mask.sum())
    denom = max(num_tokens, 1)
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    # sum_w p log p - p log q; xlogy gives 0 for p = 0 (perturbed or underflowed teacher entries).
    kl_per_token = (torch.xlogy(p, p) - p * log_q).sum(dim=-1)  # [B, T]
    kd = (kl_per_token * mask).sum() / denom
    ce = F.cross_entropy(
        student_logits.float().reshape(-1, student_logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    ) / denom
    total = alpha * temperature**2 * kd + (1.0 - alpha) * ce
    return KDLossOutput(total=total, kd=kd, ce=ce, num_tokens=num_tokens)


def counterfactual_pairing(student_logits: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                           partner_rows: torch.Tensor, partner_positions: torch.Tensor) -> torch.Tensor:
    """Counterfactual logit pairing (Garg et al., 2019, "Counterfactual fairness in text classification
    through robustness") for sequence outputs: the mean over paired target positions of the symmetric
    KL between the student's distributions on an item (rows, positions) and on its counterfactual
    partner in the same batch (partner_rows, partner_positions); all four are index tensors [P].
    Gradients reach both sides. 0 when nothing is paired."""
    if rows.numel() == 0:
        return student_logits.sum() * 0.0
    log_a = F.log_softmax(student_logits[rows, positions].float(), dim=-1)  # [P, V]
    log_b = F.log_softmax(student_logits[partner_rows, partner_positions].float(), dim=-1)
    kl = (log_a.exp() * (log_a - log_b)).sum(-1) + (log_b.exp() * (log_b - log_a)).sum(-1)
    return 0.5 * kl.mean()


class HiddenStateLoss(torch.nn.Module):
    """MSE between projected student hidden states and the teacher's: mean over masked positions of
    mean_d (W h_s + b - h_t)^2, with W: student_dim -> teacher_dim learned (trained with the student).

    When the widths match, W starts as the identity, so a student initialised from teacher layers
    starts with the plain MSE.
    """

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(student_dim, teacher_dim)
        if student_dim == teacher_dim:
            with torch.no_grad():
                self.proj.weight.copy_(torch.eye(teacher_dim))
                self.proj.bias.zero_()

    def forward(self, student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """student_hidden [B, T, ds], teacher_hidden [B, T, dt], mask [B, T] (True/1 = counted)."""
        diff = self.proj(student_hidden.float()) - teacher_hidden.detach().float()
        per_position = diff.pow(2).mean(dim=-1)
        mask = mask.to(per_position.dtype)
        return (per_position * mask).sum() / mask.sum().clamp_min(1.0)
