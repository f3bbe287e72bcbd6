"""Unit tests of the distillation losses (distill/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import HiddenStateLoss, kd_loss, teacher_probs


def _batch(seed: int = 0, batch: int = 2, length: int = 5, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=g)
    teacher = torch.randn(batch, length, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, -2:] = -100  # padding
    return student, teacher, labels


def test_kd_term_is_zero_when_student_equals_teacher():
    student, _, labels = _batch()
    out = kd_loss(student, labels, teacher_logits=student.clone(), alpha=1.0, temperature=2.0)
    assert out.kd.item() == pytest.approx(0.0, abs=1e-6)
    assert out.total.item() == pytest.approx(0.0, abs=1e-6)


def test_kd_positive_when_different():
    student, teacher, labels = _batch()
    out = kd_loss(student, labels, teacher_logits=teacher, alpha=1.0, temperature=1.0)
    assert out.kd.item() > 0.01


def test_gradients_reach_student_only():
    student, teacher, labels = _batch()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    out = kd_loss(student, labels, teacher_logits=teacher, alpha=0.7, temperature=2.0)
    out.total.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_teacher_under_inference_mode_is_accepted():
    student, _, labels = _batch()
    model = torch.nn.Linear(11, 11)
    with torch.inference_mode():
        teacher = model(torch.randn(2, 5, 11))
    student.requires_grad_(True)
    out = kd_loss(student, labels, teacher_logits=teacher, alpha=0.5, temperature=1.0)
    out.total.backward()
    assert student.grad is not None
    assert model.weight.grad is None


def test_temperature_scaling_matches_hand_computation():
    # One target token, vocabulary of 2. Teacher logits (0, ln 3), student logits (0, 0), T = 2.
    teacher = torch.tensor([[[0.0, math.log(3.0)]]])
    student = torch.tensor([[[0.0, 0.0]]])
    labels = torch.tensor([[1]])
    T, alpha = 2.0, 0.25
    # p_T = softmax((0, ln3)/2) = (1, sqrt3) / (1 + sqrt3); q_T = (1/2, 1/2).
    s3 = math.sqrt(3.0)
    p = [1 / (1 + s3), s3 / (1 + s3)]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    ce = math.log(2.0)  # student CE at temperature 1: -log(1/2)
    out = kd_loss(student, labels, teacher_logits=teacher, alpha=alpha, temperature=T)
    assert out.kd.item() == pytest.approx(kl, rel=1e-5)
    assert out.ce.item() == pytest.approx(ce, rel=1e-6)
    assert out.total.item() == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-5)


def test_padding_positions_contribute_nothing():
    student, teacher, labels = _batch()
    base = kd_loss(student, labels, teacher_logits=teacher, alpha=0.5, temperature=2.0)
    student2, teacher2 = student.clone(), teacher.clone()
    student2[0, -2:] = torch.randn(2, 11) * 100
    teacher2[0, -2:] = torch.randn(2, 11) * 100
    changed = kd_loss(student2, labels, teacher_logits=teacher2, alpha=0.5, temperature=2.0)
    assert changed.total.item() == pytest.approx(base.total.item(), rel=1e-6)
    assert base.num_tokens == 8
    # ... while a change at a real target position does change it.
    student2[1, 0, 3] += 5.0  # (a constant shift of a whole row would not change the softmax)
    assert kd_loss(student2, labels, teacher_logits=teacher2, alpha=0.5, temperature=2.0).total.item() != pytest.approx(
        base.total.item(), rel=1e-6
    )


def test_probabilities_given_directly_equal_logits_path():
    student, teacher, labels = _batch()
    from_logits = kd_loss(student, labels, teacher_logits=teacher, alpha=0.6, temperature=3.0)
    from_probs = kd_loss(student, labels, teacher_probs_T=teacher_probs(teacher, 3.0), alpha=0.6, temperature=3.0)
    assert from_probs.total.item() == pytest.approx(from_logits.total.item(), rel=1e-6)


def test_zero_teacher_probabilities_are_finite():
    student, teacher, labels = _batch()
    p = teacher_probs(teacher, 1.0)
    p[..., 0] = 0.0
    p = p / p.sum(-1, keepdim=True)
    out = kd_loss(student, labels, teacher_probs_T=p, alpha=1.0)
    assert math.isfinite(out.total.item())


def test_alpha_zero_is_plain_cross_entropy():
    student, teacher, labels = _batch()
    out = kd_loss(student, labels, teacher_logits=teacher, alpha=0.0)
    ref = torch.nn.functional.cross_entropy(student.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    assert out.total.item() == pytest.approx(ref.item(), rel=1e-6)


def test_bad_arguments_raise():
    student, teacher, labels = _batch()
    with pytest.raises(ValueError, match="exactly one"):
        kd_loss(student, labels)
    with pytest.raises(ValueError, match="tokenizer"):
        kd_loss(student, labels, teacher_logits=teacher[..., :5])


def test_hidden_state_loss_projection_and_mask():
    torch.manual_seed(0)
    hidden = torch.randn(2, 4, 8)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    same = HiddenStateLoss(8, 8)
    assert same(hidden, hidden, mask).item() == pytest.approx(0.0, abs=1e-7)  # identity start
    changed = hidden.clone()
    changed[0, 3] += 10.0  # masked position
    assert same(hidden, changed, mask).item() == pytest.approx(0.0, abs=1e-7)
    # Different widths: the projection is trainable and the teacher side gets no gradient.
    loss_fn = HiddenStateLoss(8, 16)
    student = hidden.clone().requires_grad_(True)
    teacher = torch.randn(2, 4, 16, requires_grad=True)
    loss = loss_fn(student, teacher, mask)
    loss.backward()
    assert loss.item() > 0
    assert loss_fn.proj.weight.grad is not None and student.grad is not None
    assert teacher.grad is None
