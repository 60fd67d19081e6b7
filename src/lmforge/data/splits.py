"""Records (dicts from ``lmforge.data.sources``) into splits: their text and label fields, label
sets, seeded (optionally stratified) or ordered train/val/test splits, and class balancing.

Labels may be strings or integers; the label set (sorted, or as the recipe lists it) fixes the
class ids a classifier saves with the model (``model.labels``). Every task that splits records
(classify, sft, dpo, grpo) uses :func:`split_for_data`.
"""

from __future__ import annotations

import random

from lmforge.errors import DataError


# ------------------------------------------------------------------------------ labels
def label_name(value, where: str, field_name: str) -> str:
    """A record's label as a string (ints and strings alike: 1 and "1" are the same label)."""
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int)):
        raise DataError(f"{where}: label field {field_name!r} is {value!r}; expected a string or an integer")
    text = str(value).strip()
    if not text:
        raise DataError(f"{where}: label field {field_name!r} is empty")
    return text


def label_set(names: list[str]) -> list[str]:
    """The sorted label set: numerically when every label is an integer, else alphabetically."""
    unique = set(names)
    if all(n.lstrip("-").isdigit() for n in unique):
        return sorted(unique, key=int)
    return sorted(unique)


def record_text(rec: dict, field_name: str) -> str:
    where = rec.get("_where", "record")
    if field_name not in rec:
        present = ", ".join(repr(k) for k in rec if k != "_where") or "(none)"
        raise DataError(f"{where}: no text field {field_name!r}; fields present: {present}")
    value = rec[field_name]
    if not isinstance(value, str):
        raise DataError(f"{where}: text field {field_name!r} is {type(value).__name__}; expected a string")
    return value


def record_label(rec: dict, field_name: str) -> str:
    where = rec.get("_where", "record")
    if field_name not in rec:
        present = ", ".join(repr(k) for k in rec if k != "_where") or "(none)"
        raise DataError(f"{where}: no label field {field_name!r}; fields present: {present}")
    return label_name(rec[field_name], where, field_name)


# ------------------------------------------------------------------------------ splits
def split_records(records: list[dict], fractions: tuple[float, ...], seed: int,
                  key=None) -> list[list[dict]]:
    """Split ``records`` into len(fractions)+1 parts (the last takes the rest), shuffled by
    ``seed``; with ``key`` each group (e.g. each label) is split on its own, so every part keeps
    the label proportions (a stratified split)."""
    rng = random.Random(seed)
    groups: dict = {}
    for r in records:
        groups.setdefault(key(r) if key else None, []).append(r)
    parts: list[list[dict]] = [[] for _ in range(len(fractions) + 1)]
    for g in sorted(groups, key=str):
        items = groups[g][:]
        rng.shuffle(items)
        start = 0
        for i, f in enumerate(fractions):
            n = int(round(f * len(items)))
            parts[i + 1].extend(items[start:start + n])
            start += n
        parts[0].extend(items[start:])
    for p in parts:
        rng.shuffle(p)
    return parts  # [rest (train), fractions[0] part, fractions[1] part, ...]


def split_for_data(records: list, data, seed: int, key=None, positions: list[int] | None = None,
                   total: int | None = None) -> list[list]:
    """[train, val, test] of ``records`` as a ``data:`` section asks: fractions of the training
    sources unless val/test have sources of their own (then that part stays empty here), in file
    order with ``data.split: ordered`` (see :func:`ordered_split`) or seeded-shuffled (stratified
    by ``key``) otherwise."""
    fracs = (0.0 if data.val_sources else data.val_fraction, 0.0 if data.test_sources else data.test_fraction)
    if data.split == "ordered":
        return ordered_split(records, *fracs, positions=positions, total=total)
    return split_records(records, fracs, seed, key)


def ordered_split(records: list, val_fraction: float, test_fraction: float, positions: list[int] | None = None,
                  total: int | None = None) -> list[list]:
    """[train, val, test] in file order, laid out as the classic book splits its instruction data:
    the first records train, the next ``test_fraction`` test, the last ``val_fraction`` validate.

    ``positions``/``total``: each record's position among ``total`` source records, when some
    were dropped (e.g. unusable pairs): the boundaries are then those of the full file."""
    total = len(records) if total is None else total
    positions = range(len(records)) if positions is None else positions
    n_val, n_test = int(round(val_fraction * total)), int(round(test_fraction * total))
    n_train = total - n_val - n_test
    parts: list[list] = [[], [], []]
    for r, pos in zip(records, positions, strict=True):
        parts[0 if pos < n_train else 2 if pos < n_train + n_test else 1].append(r)
    return parts


def balance_records(records: list[dict], key, seed: int) -> list[dict]:
    """Undersample every group to the size of the smallest one (the book's 747/747 spam set)."""
    rng = random.Random(seed)
    groups: dict = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    n = min(len(v) for v in groups.values())
    out = []
    for g in sorted(groups, key=str):
        out.extend(rng.sample(groups[g], n))
    rng.shuffle(out)
    return out
