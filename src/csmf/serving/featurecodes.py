"""Raw feature values -> a tower's inputs, at serving time, exactly as csmf.backbones.features built them in
training.

An export records, per feature column in the order the towers read them, how a value became an input
(csmf.feature_schema.feature_columns). `encode` (at serving) turns one entity's raw values into codes and
standardised numbers; a value not seen in training, a missing column or a list column (a bag, not read online)
is reported and contributes nothing, as an unknown value would.
"""

from __future__ import annotations

import numpy as np

from csmf.feature_schema import value_key
from csmf.hashing import mix64


def _number(value) -> float | None:
    """A finite number from a JSON number or numeric text, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if np.isfinite(number) else None


class FeatureCodes:
    """One tower's feature columns (csmf.feature_schema.feature_columns): raw values -> codes and
    standardised dense values."""

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
        key = value_key(value) if column["numeric"] else (value if isinstance(value, str) else None)
        if key is None:
            return None
        if column["kind"] == "categorical":
            return self.codes[column["name"]].get(key)
        if not key.lstrip("-").isdigit():  # hashed columns are integer ids
            return None
        hashed = mix64(np.array([int(key)], dtype=np.int64).view(np.uint64))[0] >> np.uint64(1)
        return int(hashed) % column["buckets"]
