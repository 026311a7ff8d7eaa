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


def check_teacher(
    path: str, *, student_tokenizer: Any, task: str, label_names: list[str] | None, trust_remote_code: bool = False
) -> None:
    """Refuse a teacher that cannot teach this student, reading no weights.

    Its task must be the student's; its tokenizer must map tokens to the same ids (see
    :func:`check_same_tokenizer`); a classifier's label names must be the student's, in order.

    Raises:
        ConfigError: on a task, tokenizer or label mismatch.
        ModelLoadError: when ``path`` is no model (or an unfinished run).
    """
    from bittune.artifacts import label_names_of, load_tokenizer_of, resolve
    from bittune.errors import ModelLoadError

    try:
        artifact = resolve(path)
    except ModelLoadError as exc:  # named as the user wrote it: the config key
        raise ModelLoadError(f"distill.teacher: {exc.message}", hint=exc.hint) from None
    if artifact.task != task:
        raise ConfigError(
            f"distill.teacher {path} is a {artifact.task} model but the student is trained for {task}",
            hint="use a teacher trained for the same task (for a classifier: a run or folder with its head)",
        )
    teacher_tokenizer = load_tokenizer_of(artifact, trust_remote_code=trust_remote_code)
    check_same_tokenizer(student_tokenizer, teacher_tokenizer, path)
    if task == "classification" and label_names is not None:
        names = label_names_of(artifact, trust_remote_code=trust_remote_code)
        if names != list(label_names):
            raise ConfigError(
                f"distill.teacher {path} predicts the labels {names}, the student's data has {list(label_names)}",
                hint="distill from a classifier trained on the same label set",
            )


def load_teacher(
    path: str,
    *,
    device: torch.device,
    trust_remote_code: bool = False,
    student_tokenizer: Any = None,
    task: str | None = None,
    label_names: list[str] | None = None,
) -> torch.nn.Module:
    """Load a frozen teacher (model folder, adapter folder, run directory or hub id) in eval mode on ``device``.

    With ``student_tokenizer`` and ``task``, :func:`check_teacher` runs first (training runs it in preflight).

    Raises:
        ConfigError: on a tokenizer, task or label mismatch.
        ModelLoadError: when the teacher cannot be loaded.
    """
    from bittune.artifacts import load

    if student_tokenizer is not None and task is not None:
        check_teacher(
            path, student_tokenizer=student_tokenizer, task=task, label_names=label_names,
            trust_remote_code=trust_remote_code,
        )  # fmt: skip
    teacher = load(path, device=device.type, trust_remote_code=trust_remote_code).model
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


class DistillLoss:
    """The step's loss with a teacher: :func:`distillation_loss_sum` of the student's and the teacher's logits.

    Called like :class:`bittune.training.loss.TaskLoss`; returns ``(total_sum, task_sum)``. The teacher's forward
    runs under the same autocast as the student's, without gradients. It has no ``head_at_targets``: the KL term
    needs the student's whole logit vector (every vocabulary entry, with its graph) at each label position, which
    :func:`bittune.training.loss.causal_lm_target_loss_sum` does not expose, so the step gives it the full logits.
    """

    def __init__(
        self, task: str, teacher: torch.nn.Module, *, temperature: float, alpha: float, autocast: Any = None
    ) -> None:
        import contextlib

        self.task, self.teacher = task, teacher
        self.temperature, self.alpha = temperature, alpha
        self.autocast = autocast or contextlib.nullcontext

    def targets(self, labels: torch.Tensor) -> int:
        from bittune.data.collate import count_targets

        return count_targets(self.task, labels)

    def check_student(self, student: torch.nn.Module, teacher_path: str) -> None:
        """Refuse a causal-LM student whose logits cover another vocabulary than the teacher's."""
        if self.task == "causal-lm":
            check_output_size(student, self.teacher, teacher_path)

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, inputs: dict[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast():
            t_logits = teacher_logits(self.teacher, inputs)
        return distillation_loss_sum(
            self.task, logits, t_logits, labels, temperature=self.temperature, alpha=self.alpha
        )


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
