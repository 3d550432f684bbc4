"""How a feature column becomes a model input, decided once and written down, with numpy alone: training
(csmf.backbones.features) and serving (csmf.serving.featurecodes) both read it, and a serving process never
loads torch for it.
"""

from __future__ import annotations

import numpy as np


def column_kind(name: str, values: np.ndarray, max_categories: int, dense_names: tuple[str, ...] = (),
                categorical_names: tuple[str, ...] = ()) -> str:  # fmt: skip
    """How a feature column becomes an input: "bag" (a list column: (n, L) codes, 0 = padding), "dense" (a
    non-integer column, or named in model.dense_features: standardised), "categorical" (an integer or text
    column with at most max_categories values: embedded) or "hashed" (more values: a stable hash into
    model.hash_buckets buckets)."""
    if values.ndim == 2:
        return "bag"
    is_int = np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))
    if name in dense_names or not (is_int or name in categorical_names):
        return "dense"
    return "categorical" if len(np.unique(values)) <= max_categories else "hashed"


def value_key(value) -> str | None:
    """A value's canonical text: integral numbers as integers ("3", from 3, 3.0 or "3"), other numbers as
    Python floats, text as is; None for a value that is neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        number = float(value)
        if not np.isfinite(number):
            return None
        return str(int(number)) if number.is_integer() else repr(number)
    return str(value) if isinstance(value, str) else None


def feature_columns(arrays: dict[str, np.ndarray], m) -> list[dict]:
    """How each column `features_of(arrays, m)` reads became an input, in the order the towers read them
    (categorical and hashed columns, one table each, sorted by name; then bags; then the dense columns): a
    categorical column's sorted distinct values (its code is the position), a hashed column's bucket count, a
    dense column's mean and standard deviation. What an export records so serving encodes raw values exactly as
    training did (csmf.serving.featurecodes)."""
    if not m.features:
        return []
    tables, bags, dense = [], [], []
    for name, values in sorted(arrays.items()):
        values = np.asarray(values)
        kind = column_kind(name, values, m.max_categories, m.dense_features, m.categorical_features)
        numeric = values.dtype.kind in "iuf"
        if kind == "bag":
            bags.append({"name": name, "kind": "bag"})
        elif kind == "dense":
            v = values.astype(np.float64)
            dense.append({"name": name, "kind": "dense", "mean": float(v.mean()), "std": float(v.std())})
        elif kind == "categorical":
            keys = [value_key(v.item() if numeric else str(v)) for v in np.unique(values)]
            tables.append({"name": name, "kind": "categorical", "numeric": numeric, "values": keys})
        else:
            tables.append({"name": name, "kind": "hashed", "numeric": numeric, "buckets": int(m.hash_buckets)})
    return tables + bags + dense
