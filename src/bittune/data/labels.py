"""Class labels for sequence classification: names in id order, and each row's id."""

from __future__ import annotations

from bittune.data.formats import ClassificationExample
from bittune.errors import DataError


def _sort_key(name: str) -> tuple[int, int | str]:
    # '2' before '10' when every name is a number; otherwise alphabetical.
    return (0, int(name)) if name.isdigit() else (1, name)


def build_label_names(examples: list[ClassificationExample], given: list[str] | None = None) -> list[str]:
    """Class names, index = class id.

    ``given`` (e.g. from a checkpoint) wins. Otherwise string labels are sorted by name; if every label is an
    integer it is used as the id itself and the names are ``"0" .. str(max id)``.

    Raises:
        DataError: There are no labels, or only one class.
    """
    if given is not None:
        return list(given)
    labels = [e.label for e in examples]
    if not labels:
        raise DataError(
            "classification needs training rows with labels, and there are none", hint="add rows to the training file"
        )
    if all(isinstance(x, int) for x in labels):
        names = [str(i) for i in range(max(labels) + 1)]  # type: ignore[type-var,operator]
    else:
        names = sorted({str(x) for x in labels}, key=_sort_key)
    if len(names) < 2:
        raise DataError(
            f"{examples[0].where}: every training row has label '{names[0]}'; classification needs 2+ classes",
            hint="check the label column (data.columns.label), or add rows of other classes",
        )
    return names


def label_ids(examples: list[ClassificationExample], names: list[str], split: str, column: str = "label") -> list[int]:
    """The class id of every example.

    Args:
        examples: Parsed rows.
        names: Class names in id order.
        split: ``"train"`` or ``"eval"``, for the error message.
        column: The user's label column, for the error message.

    Raises:
        DataError: A label is not a known class (naming the row and listing the known ones).
    """
    index = {n: i for i, n in enumerate(names)}
    known = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    out = []
    for e in examples:
        name = str(e.label)
        if isinstance(e.label, int) and name not in index:
            # An integer that is not itself a class name is a class id (e.g. names given by a checkpoint).
            if e.label >= len(names):
                raise DataError(
                    f"{e.where}: field '{column}' is class id {e.label}, but there are only {len(names)} classes "
                    f"(ids 0-{len(names) - 1}: {known})",
                    hint="fix the label, or give the classes as names",
                )
            out.append(e.label)
            continue
        if name not in index:
            source = "the training labels" if split == "eval" else "the model's labels"
            raise DataError(
                f"{e.where}: field '{column}' is '{name}', which is not one of {source}: {known}",
                hint="fix the label; a class the model was not trained on cannot be evaluated"
                if split == "eval"
                else "fix the label, or train a new classifier with all the classes",
            )
        out.append(index[name])
    return out
