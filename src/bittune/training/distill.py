"""Knowledge distillation: a frozen teacher's softened outputs as an extra training target.

Loss of an optimizer step (before the division by the step's target count that every bittune loss gets)::

    alpha * T^2 * sum KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * sum task_loss

summed over the same terms as the task loss: completion tokens (labels != -100, shifted) for causal LMs, rows for
classifiers. ``T^2`` keeps the KL gradient on the scale of the task loss's as T changes (Hinton et al.).

Teacher logits are computed on the fly, under ``torch.no_grad`` with the teacher in eval mode, for the exact
batch the student sees. Caching them to disk was considered and left out: the full distribution of a 49k-token
vocabulary is ~100 KB per token in float16, so one epoch of a small SFT set (~1M target tokens) would need
~100 GB; a top-k cache would change the loss into an approximation. The teacher forward costs about a third of a
student step (no backward), which is cheaper than that disk.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bittune.errors import ConfigError
from bittune.training.loss import loss_sum


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sum over rows of KL(softmax(teacher/T) || softmax(student/T))`` for ``[rows, classes]`` logits (float32)."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="sum")


def distillation_loss_sum(
    task: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed distillation loss of a batch, and its task-loss part (see the module docstring).

    Args:
        task: ``causal-lm`` (logits ``[batch, seq, vocab]``, labels with -100 for ignored tokens) or
            ``classification`` (logits ``[batch, classes]``).
        teacher_logits: same shape as ``student_logits``, computed without gradients.

    Returns:
        ``(total, task_sum)``; divide both by the step's target count. With ``alpha == 0``, ``total`` is
        ``task_sum``.
    """
    task_sum = loss_sum(task, student_logits, labels)
    if task == "classification":
        s, t = student_logits, teacher_logits
    else:
        keep = labels[:, 1:] != -100  # the positions that predict a completion token, as in the task loss
        s, t = student_logits[:, :-1][keep], teacher_logits[:, :-1][keep]
    if alpha == 0:
        return task_sum, task_sum
    total = alpha * temperature**2 * kl_sum(s, t, temperature) + (1 - alpha) * task_sum
    return total, task_sum


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """The teacher's logits for the student's batch (no graph is kept)."""
    return teacher(**inputs).logits


def check_same_tokenizer(student: Any, teacher: Any, teacher_path: str) -> None:
    """Refuse a teacher whose tokenizer differs from the student's: its token ids would mean other tokens.

    Raises:
        ConfigError: naming the first difference (vocabulary size, a token, or a special token id).
    """
    fix = "distill from a model of the student's own family (same tokenizer), e.g. a larger or fine-tuned sibling"
    s_vocab, t_vocab = student.get_vocab(), teacher.get_vocab()
    if len(s_vocab) != len(t_vocab):
        raise ConfigError(
            f"distill.teacher {teacher_path}: its tokenizer has {len(t_vocab)} tokens, the student's {len(s_vocab)}",
            hint=fix,
        )
    if s_vocab != t_vocab:
        diff = sorted(tok for tok in s_vocab if t_vocab.get(tok) != s_vocab[tok])[:3]
        raise ConfigError(
            f"distill.teacher {teacher_path}: its tokenizer maps tokens to other ids than the student's "
            f"(e.g. {', '.join(repr(t) for t in diff)})",
            hint=fix,
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        a, b = getattr(student, name, None), getattr(teacher, name, None)
        if a != b:
            raise ConfigError(
                f"distill.teacher {teacher_path}: {name} is {b} in the teacher's tokenizer and {a} in the student's",
                hint=fix,
            )


def load_teacher(
    path: str,
    *,
    student_tokenizer: Any,
    task: str,
    label_names: list[str] | None,
    device: torch.device,
    trust_remote_code: bool = False,
) -> torch.nn.Module:
    """Load a frozen teacher (model folder, adapter folder, run directory or hub id) in eval mode on ``device``.

    The tokenizer is checked before any weights are read; the task and, for classifiers, the label names (in
    order) must match the student's too.

    Raises:
        ConfigError: on a tokenizer, task or label mismatch.
        ModelLoadError: when the teacher cannot be loaded.
    """
    from bittune.artifacts import load, load_tokenizer_of, resolve

    artifact = resolve(path)
    if artifact.task != task:
        raise ConfigError(
            f"distill.teacher {path} is a {artifact.task} model but the student is trained for {task}",
            hint="use a teacher trained for the same task (for a classifier: a run or folder with its head)",
        )
    teacher_tokenizer = load_tokenizer_of(artifact, trust_remote_code=trust_remote_code)
    check_same_tokenizer(student_tokenizer, teacher_tokenizer, path)
    teacher = load(artifact, device=device.type, trust_remote_code=trust_remote_code, tokenizer=teacher_tokenizer).model
    if task == "classification":
        cfg = teacher.config
        names = [cfg.id2label[i] for i in range(cfg.num_labels)]
        if label_names is not None and names != list(label_names):
            raise ConfigError(
                f"distill.teacher {path} predicts the labels {names}, the student's data has {list(label_names)}",
                hint="distill from a classifier trained on the same label set",
            )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


def check_output_size(student: torch.nn.Module, teacher: torch.nn.Module, teacher_path: str) -> None:
    """Refuse a causal-LM teacher whose logits cover another number of tokens than the student's.

    Raises:
        ConfigError: when the output embeddings differ in size (e.g. one of them was resized or padded).
    """
    s_out = student.get_output_embeddings().weight.shape[0]
    t_out = teacher.get_output_embeddings().weight.shape[0]
    if s_out != t_out:
        raise ConfigError(
            f"distill.teacher {teacher_path} outputs {t_out} logits per token, the student {s_out}",
            hint="use a teacher whose vocabulary (output embedding) has the student's size",
        )
