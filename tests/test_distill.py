"""Distillation loss against a hand computation, its limits, and the tokenizer check."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from bittune.errors import ConfigError
from bittune.training.distill import check_same_tokenizer, distillation_loss_sum, teacher_logits
from bittune.training.loss import loss_sum
from tiny import make_tokenizer


def softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def test_classification_loss_equals_a_hand_computation():
    student = [[1.0, -0.5, 0.2], [0.3, 0.9, -1.2]]
    teacher = [[2.0, 0.1, -1.0], [-0.4, 1.5, 0.0]]
    labels = [0, 2]
    t, alpha = 2.0, 0.3
    kl_sum = sum(kl(softmax(tr, t), softmax(sr, t)) for sr, tr in zip(student, teacher))
    ce_sum = sum(-math.log(softmax(sr, 1.0)[y]) for sr, y in zip(student, labels))
    expected = alpha * t * t * kl_sum + (1 - alpha) * ce_sum
    total, task = distillation_loss_sum(
        "classification", torch.tensor(student), torch.tensor(teacher), torch.tensor(labels), temperature=t, alpha=alpha
    )
    assert float(task) == pytest.approx(ce_sum, rel=1e-6)
    assert float(total) == pytest.approx(expected, rel=1e-6)


def test_causal_lm_loss_uses_only_completion_tokens():
    torch.manual_seed(0)
    student, teacher = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    labels = torch.tensor([[-100, -100, 2, 1, -100]])  # tokens 2 and 3 are targets, predicted at positions 1, 2
    t, alpha = 1.5, 0.5
    s, te = student[0].tolist(), teacher[0].tolist()
    kl_sum = kl(softmax(te[1], t), softmax(s[1], t)) + kl(softmax(te[2], t), softmax(s[2], t))
    ce_sum = -math.log(softmax(s[1], 1.0)[2]) - math.log(softmax(s[2], 1.0)[1])
    total, task = distillation_loss_sum("causal-lm", student, teacher, labels, temperature=t, alpha=alpha)
    assert float(task) == pytest.approx(ce_sum, rel=1e-6)
    assert float(total) == pytest.approx(alpha * t * t * kl_sum + (1 - alpha) * ce_sum, rel=1e-6)
    # Changing the teacher where there is no target changes nothing.
    teacher2 = teacher.clone()
    teacher2[0, 0] += 5.0
    teacher2[0, 3:] -= 3.0
    again, _ = distillation_loss_sum("causal-lm", student, teacher2, labels, temperature=t, alpha=alpha)
    assert torch.equal(again, total)


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_alpha_zero_is_exactly_the_task_loss(task):
    torch.manual_seed(1)
    if task == "classification":
        student, teacher, labels = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    else:
        student, teacher = torch.randn(2, 6, 7), torch.randn(2, 6, 7)
        labels = torch.randint(0, 7, (2, 6))
        labels[:, :2] = -100
    total, part = distillation_loss_sum(task, student, teacher, labels, temperature=3.0, alpha=0.0)
    assert torch.equal(total, loss_sum(task, student, labels)) and torch.equal(part, total)


def test_alpha_one_is_pure_kl_and_zero_when_the_teacher_agrees():
    torch.manual_seed(2)
    logits, labels = torch.randn(3, 5), torch.tensor([0, 1, 4])
    same, _ = distillation_loss_sum("classification", logits, logits.clone(), labels, temperature=2.0, alpha=1.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    other, _ = distillation_loss_sum("classification", logits, torch.randn(3, 5), labels, temperature=2.0, alpha=1.0)
    assert float(other) > 0.01


def test_sums_split_over_micro_batches_add_up_to_the_big_batch():
    """The loss is a sum, so gradient accumulation (sum / step target count) equals one big batch."""
    torch.manual_seed(3)
    s, t = torch.randn(4, 6, 9), torch.randn(4, 6, 9)
    labels = torch.randint(0, 9, (4, 6))
    labels[0, :4] = -100
    big, _ = distillation_loss_sum("causal-lm", s, t, labels, temperature=2.0, alpha=0.7)
    parts = [distillation_loss_sum("causal-lm", s[i : i + 1], t[i : i + 1], labels[i : i + 1], temperature=2.0,
                                   alpha=0.7)[0] for i in range(4)]  # fmt: skip
    assert float(sum(parts)) == pytest.approx(float(big), rel=1e-5)


class _Head(torch.nn.Module):
    """A stand-in model: ``model(x=...).logits`` like a transformers classifier."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.lin(x))


def test_gradient_reaches_the_student_only():
    # The teacher's weights require grad here (load_teacher freezes them; this checks the path without that), so a
    # gradient leaking into the teacher would land on them, as the control below shows it would.
    student, teacher = _Head(0), _Head(1)
    x, labels = torch.randn(3, 5), torch.tensor([0, 1, 2])

    def loss(teacher_out: torch.Tensor) -> torch.Tensor:
        total, _ = distillation_loss_sum("classification", student(x=x).logits, teacher_out, labels,
                                         temperature=2.0, alpha=0.5)  # fmt: skip
        return total

    loss(teacher_logits(teacher, {"x": x})).backward()
    assert student.lin.weight.grad is not None and student.lin.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # Control: the same loss on logits taken with the graph kept does put a gradient on the teacher.
    loss(teacher(x=x).logits).backward()
    assert teacher.lin.weight.grad is not None and teacher.lin.weight.grad.abs().sum() > 0


def test_same_tokenizer_passes_and_different_ones_are_refused():
    a, b = make_tokenizer(), make_tokenizer()
    check_same_tokenizer(a, b, "teacher")
    extra = make_tokenizer()
    extra.add_tokens(["zebra"])
    with pytest.raises(ConfigError, match="tokens, the student's"):
        check_same_tokenizer(a, extra, "teacher")
    other_pad = make_tokenizer(pad_equals_eos=True)
    with pytest.raises(ConfigError, match="pad_token_id"):
        check_same_tokenizer(a, other_pad, "teacher")
