"""Raw feature values -> a tower's inputs, at serving time, exactly as csmf.towers.Features built them in training.

`encoders` (at export) records, per feature column in the order the towers read them, how a value became an
input: a categorical column's sorted distinct values (its code is the position), a hashed column's bucket
count (a stable hash of the integer value), a dense column's mean and standard deviation. `encode` (at
serving) turns one entity's raw values into codes and standardised numbers; a value not seen in training, a
missing column or a list column (a bag, not read online) is reported and contributes nothing, as an unknown
value would.
"""

from __future__ import annotations

import numpy as np

from csmf.hashing import mix64


def _key(value) -> str | None:
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


def _number(value) -> float | None:
    """A finite number from a JSON number or numeric text, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if np.isfinite(number) else None


def encoders(arrays: dict[str, np.ndarray], m) -> list[dict]:
    """The columns csmf.towers.features_of(arrays, m) reads, in its order: categorical and hashed columns (one
    table each, sorted by name), then bags, then the dense columns (sorted by name)."""
    if not m.features:
        return []
    tables, bags, dense = [], [], []
    for name, values in sorted(arrays.items()):
        values = np.asarray(values)
        if values.ndim == 2:
            bags.append({"name": name, "kind": "bag"})
            continue
        numeric = values.dtype.kind in "iuf"
        is_int = np.issubdtype(values.dtype, np.integer) or bool(np.all(np.mod(values, 1) == 0))
        if name in m.dense_features or not (is_int or name in m.categorical_features):
            v = values.astype(np.float64)
            dense.append({"name": name, "kind": "dense", "mean": float(v.mean()), "std": float(v.std())})
            continue
        uniques = np.unique(values)
        if len(uniques) <= m.max_categories:
            keys = [_key(v.item() if numeric else str(v)) for v in uniques]
            tables.append({"name": name, "kind": "categorical", "numeric": numeric, "values": keys})
        else:
            tables.append({"name": name, "kind": "hashed", "numeric": numeric, "buckets": int(m.hash_buckets)})
    return tables + bags + dense


class FeatureCodes:
    """One tower's feature columns (from `encoders`): raw values -> codes and standardised dense values."""

    def __init__(self, columns: list[dict]):
        self.columns = columns
        self.names = {c["name"] for c in columns}
        self.codes = {c["name"]: {v: n for n, v in enumerate(c["values"])}
                      for c in columns if c["kind"] == "categorical"}  # fmt: skip
        self.tables = [c for c in columns if c["kind"] in ("categorical", "hashed", "bag")]  # one table each
        self.dense = [c for c in columns if c["kind"] == "dense"]

    def encode(self, raw: dict) -> tuple[list[int | None], np.ndarray, list[str]]:
        """(a code per table column, None when unknown or a bag; the standardised dense values, 0 when unknown;
        the names given that were not understood, in order)."""
        codes, dense, unknown = [], [], []
        for column in self.tables:
            name = column["name"]
            value = raw.get(name)
            code = None if column["kind"] == "bag" else self._code(column, value)
            if code is None and value is not None:
                unknown.append(name)
            codes.append(code)
        for column in self.dense:
            value = raw.get(column["name"])
            number = _number(value)
            if number is None:
                if value is not None:
                    unknown.append(column["name"])
                dense.append(0.0)  # the training mean
            else:
                dense.append((number - column["mean"]) / (column["std"] + 1e-8))
        unknown += [name for name in raw if name not in self.names]
        return codes, np.asarray(dense, dtype=np.float32), unknown

    def _code(self, column: dict, value) -> int | None:
        key = _key(value) if column["numeric"] else (value if isinstance(value, str) else None)
        if key is None:
            return None
        if column["kind"] == "categorical":
            return self.codes[column["name"]].get(key)
        if not key.lstrip("-").isdigit():  # hashed columns are integer ids
            return None
        hashed = mix64(np.array([int(key)], dtype=np.int64).view(np.uint64))[0] >> np.uint64(1)
        return int(hashed) % column["buckets"]
