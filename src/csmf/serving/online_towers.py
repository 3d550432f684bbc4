"""The towers in the serving artifact, run with numpy alone: a user's behaviour history (and, for a new user,
raw features) -> the user's vector; an item's raw features -> a new item's vector.

`csmf export` writes each tower at the model's top stage with every stage mask folded in (a weight no objective
uses is 0; Backbone.export_towers), so a server computes the vector of a user or item it has never seen without torch
and without retraining. Objective weights fold into the user vector afterwards, as for precomputed users.
Raw feature values become inputs as in training (csmf.serving.featurecodes).

graph encoder (csmf.backbones.graph): u = sum_k (c_k @ V) * [owner == k] + the feature part, where V is the served
  item matrix (the sum of the stages' smoothed item layers, which own disjoint columns) and c_k is the
  user's normalised row of stage k's graph: c_k[i] = a_k[i] * s_k[i] / sqrt(sum_j a_k[j]), a_k[i] = sum over
  behaviours b of w_kb * [i in history_b], s_k = 1 / sqrt(item degree) in stage k's training graph. The
  feature part is the mean of the user's feature rows (a known user's from training, a new user's from the
  request). A new item is a graph node without edges: its vector is the mean of its feature rows on the
  stages' columns over (graph_hops + 1), the share of the item vector that propagation leaves it.
mlp encoder (csmf.backbones.mlp): x = the entity's fixed inputs (ID embedding, features, unknown context; zeros
  for a new one, whose features fill their slots) with each behaviour's bag (sum of the history table's
  rows / count ** bag_power) in its slot, then the masked MLP: relu between layers.
"""

from __future__ import annotations

import numpy as np

from csmf.serving.featurecodes import FeatureCodes

TOWER_KINDS = ("graph", "mlp")


def _mlp(arrays: dict[str, np.ndarray], x: np.ndarray, layers: int, prefix: str = "") -> np.ndarray:
    h = x
    for n in range(layers):
        h = arrays[f"{prefix}w{n}"] @ h + arrays[f"{prefix}b{n}"]
        if n < layers - 1:
            h = np.maximum(h, 0.0)
    return h.astype(np.float32)


class _FeatureInputs:
    """A tower's feature columns and tables: raw values -> the rows they add (graph) or the slots they fill."""

    def __init__(self, spec: dict, arrays: dict[str, np.ndarray], prefix: str):
        self.spec, self.codes = spec, FeatureCodes(spec["columns"])
        self.tables = [arrays.get(f"{prefix}feat{j}") for j in range(len(self.codes.tables))]
        self.dense_map = arrays.get(f"{prefix}dense")

    def graph_part(self, raw: dict, dim: int) -> tuple[np.ndarray, list[str]]:
        """The mean over the parts of the rows of the encoded values (unknown ones add nothing)."""
        codes, dense, unknown = self.codes.encode(raw)
        total = np.zeros(dim, dtype=np.float32)
        for code, table in zip(codes, self.tables, strict=True):
            if code is not None and table is not None:
                total += table[code]
        if self.dense_map is not None:
            total += dense @ self.dense_map
        return total / max(self.spec["parts"], 1), unknown

    def fill(self, x: np.ndarray, raw: dict) -> list[str]:
        """Write the encoded values into their slots of the MLP input `x`."""
        codes, dense, unknown = self.codes.encode(raw)
        for code, table, slot in zip(codes, self.tables, self.spec["slots"], strict=True):
            if code is not None:
                x[slot : slot + table.shape[1]] = table[code]
        if len(dense):
            x[self.spec["dense_slot"] : self.spec["dense_slot"] + len(dense)] = dense
        return unknown


class UserTower:
    """A user's history (item rows per behaviour) and features -> the raw user vector, as the trained tower."""

    def __init__(self, entry: dict, arrays: dict[str, np.ndarray], item_vectors: np.ndarray, owner: np.ndarray):
        self.kind, self.entry, self.arrays = entry["kind"], entry, arrays
        self.item_vectors, self.owner = item_vectors, owner
        self.features = _FeatureInputs(entry["features"], arrays, "u")
        if self.kind == "graph":
            self.behaviours = tuple(dict.fromkeys(b for w in entry["stage_weights"] for b in w))
            self.n_items = arrays["item_scale"].shape[1]
            # per stage: its output columns (None when it owns none) and each behaviour's edge weight (0: unread)
            self.stage_columns = [np.flatnonzero(owner == k + 1) for k in range(len(entry["stage_weights"]))]
            self.edge_weights = np.array([[w.get(b, 0.0) for b in self.behaviours] for w in entry["stage_weights"]],
                                         dtype=np.float64)  # (stages, behaviours)  # fmt: skip
            self.no_features = self.features.graph_part({}, item_vectors.shape[1])[0]  # a new user sending none
        else:
            self.behaviours = tuple(entry["behaviours"])
            self.n_items = arrays["history_table"].shape[0] if "history_table" in arrays else 0

    @property
    def feature_names(self) -> list[str]:
        return [c["name"] for c in self.entry["features"]["columns"] if c["kind"] != "bag"]

    def vector(
        self, history: dict[str, np.ndarray], user_row: int | None = None, features: dict | None = None,
        vectors: np.ndarray | None = None, origin: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[str]]:  # fmt: skip
        """((D,) float32, feature names not understood). history: behaviour -> distinct served item rows;
        user_row: a known user's row (its ID embedding and training features); features: a new user's raw
        feature values (read only without user_row). vectors: the served item matrix (rows, D) and origin: the
        artifact row of each served row, -1 for an item added while serving (default: the artifact's items)."""
        if self.kind == "graph":
            return self._graph(history, user_row, features or {}, vectors, origin)
        return self._mlp(history, user_row, features or {}, origin)

    def vectors(
        self, histories: list[dict[str, np.ndarray]], user_rows: list[int | None], vectors: np.ndarray | None = None,
        origin: np.ndarray | None = None,
    ) -> np.ndarray:  # fmt: skip
        """(B, D) float32: the vectors of several users sent without raw features, each the bits `vector` gives
        for it alone. The graph tower computes the bags of all of them in one pass (the history fast path's
        batch); the MLP runs one user at a time (a matrix product over the batch would round differently)."""
        if self.kind != "graph":
            return np.stack([self._mlp(h, row, {}, origin)[0] for h, row in zip(histories, user_rows, strict=True)])
        u = self._graph_bags(histories, vectors, origin)
        side = self.arrays.get("user_side")
        for b, row in enumerate(user_rows):
            if row is None:
                u[b] = u[b] + self.no_features
            elif side is not None:
                u[b] += side[row]
        return u

    def _graph(self, history: dict[str, np.ndarray], user_row: int | None, features: dict,
               vectors: np.ndarray | None, origin: np.ndarray | None):  # fmt: skip
        u = self._graph_bags([history], vectors, origin)[0]
        if user_row is not None:
            if "user_side" in self.arrays:
                u += self.arrays["user_side"][user_row]
            return u, []
        part, unknown = self.features.graph_part(features, len(u))
        return u + part, unknown

    def _graph_bags(
        self, histories: list[dict[str, np.ndarray]], vectors: np.ndarray | None, origin: np.ndarray | None
    ) -> np.ndarray:
        """(B, D) float32: each history's sum_k (c_k @ V) * [owner == k], for all B histories at once. A user's
        numbers depend on its own history alone (its terms are summed in item-row order, apart from the other
        users'), so a history gets the same bits in any batch: an answer does not depend on what else was ready."""
        vectors = self.item_vectors if vectors is None else vectors
        u = np.zeros((len(histories), self.item_vectors.shape[1]), dtype=np.float32)
        # every (user, behaviour, item row) sent, flattened over the batch
        sent = [(n, b, items) for n, history in enumerate(histories) for b, name in enumerate(self.behaviours)
                if len(items := history.get(name, ()))]  # fmt: skip
        if not sent:
            return u
        counts = [len(items) for _, _, items in sent]
        user = np.repeat(np.array([n for n, _, _ in sent], dtype=np.int64), counts)
        kind = np.repeat(np.array([b for _, b, _ in sent], dtype=np.int64), counts)
        width = max(len(vectors), 1)
        # one entry per (user, item), by user then item row; `at`: the entry of each sent (behaviour, item)
        key, at = np.unique(user * width + np.concatenate([items for _, _, items in sent]), return_inverse=True)
        who, rows = key // width, key % width
        trained = rows if origin is None else origin[rows]
        scale = self.arrays["item_scale"]
        for k, columns in enumerate(self.stage_columns):
            # a_k[i] = sum over behaviours b of w_kb * [i in history_b]; an item no weighed behaviour names is out
            edge = np.bincount(at, weights=self.edge_weights[k][kind], minlength=len(key))  # (m,) float64
            keep = np.flatnonzero(edge > 0)
            if not len(columns) or not len(keep):
                continue
            edge, users, items, known = edge[keep], who[keep], rows[keep], trained[keep]
            degree = np.bincount(users, weights=edge)  # (users,) sum_j a_k[j], summed in item-row order
            # an item added while serving has no edge in the training graph: it is weighed as an item whose only
            # edge is this history's (its degree is the weight here), and contributes its served vector
            s = np.where(known >= 0, scale[k, np.maximum(known, 0)], 1.0 / np.sqrt(np.maximum(edge, 1e-12)))
            coef = (edge * s / np.sqrt(degree[users])).astype(np.float32)  # (m,) c_k[i]
            terms = coef[:, None] * vectors[items[:, None], columns]  # (m, |columns|) c_k[i] * V[i] on stage k's
            starts = np.flatnonzero(np.concatenate(([True], users[1:] != users[:-1])))  # each user's first entry
            u[users[starts][:, None], columns] += np.add.reduceat(terms, starts, axis=0)  # (users present, |columns|)
        return u

    def _mlp(self, history: dict[str, np.ndarray], user_row: int | None, features: dict, origin: np.ndarray | None):
        a = self.arrays
        x = (a["fixed"][user_row] if user_row is not None else a["new_user"]).copy()
        unknown = self.features.fill(x, features) if user_row is None else []
        table = a.get("history_table")
        for b, slot in zip(self.behaviours, self.entry["slots"], strict=True):
            rows = np.asarray(history.get(b, ()), dtype=np.int64)
            if len(rows):
                trained = rows if origin is None else origin[rows]
                # an item added while serving has no row in the history table: it counts in the bag's size only
                bag = table[trained[trained >= 0]].sum(axis=0)
                x[slot : slot + table.shape[1]] = bag / len(rows) ** self.entry["bag_power"]
        return _mlp(a, x, self.entry["layers"]), unknown


class ItemTower:
    """A new item's raw features -> its vector, as the trained item tower computes an item without an ID row."""

    def __init__(self, entry: dict, arrays: dict[str, np.ndarray], dim: int):
        self.kind, self.entry, self.arrays, self.dim = entry["kind"], entry, arrays, dim
        self.features = _FeatureInputs(entry["features"], arrays, "i")

    @property
    def feature_names(self) -> list[str]:
        return [c["name"] for c in self.entry["features"]["columns"] if c["kind"] != "bag"]

    def vector(self, features: dict) -> tuple[np.ndarray, list[str]]:
        if self.kind == "graph":
            return self.features.graph_part(features, self.dim)
        x = np.zeros(self.entry["width"], dtype=np.float32)
        unknown = self.features.fill(x, features)
        return _mlp(self.arrays, x, self.entry["layers"], "i"), unknown


COLUMN_KINDS = ("categorical", "hashed", "bag", "dense")


def check_tower(entry: dict, arrays: dict[str, np.ndarray], n_users: int, n_items: int, dim: int,
                side: str) -> str | None:  # fmt: skip
    """What is wrong with a tower's description and arrays (side "user" or "item"), or None."""

    def shape(name: str) -> tuple[int, ...] | None:
        return arrays[name].shape if name in arrays else None

    prefix = side[0]
    problem = _check_features(entry.get("features"), arrays, prefix, entry["kind"], dim)
    if problem:
        return problem
    if side == "item":
        if entry["kind"] == "mlp":
            return _check_layers(entry, arrays, entry.get("width"), "i", dim)
        return None
    if entry["kind"] == "graph":
        weights = entry.get("stage_weights")
        if not (isinstance(weights, list) and weights and all(
                isinstance(w, dict) and all(isinstance(b, str) and isinstance(v, int | float) and not isinstance(
                    v, bool) and v >= 0 for b, v in w.items()) for w in weights)):  # fmt: skip
            return f"stage_weights: expected a list of {{behaviour: weight >= 0}}, got {weights!r:.200}"
        if shape("item_scale") != (len(weights), n_items):
            return f"tower_item_scale.npy is {shape('item_scale')}, expected {(len(weights), n_items)}"
        if "user_side" in arrays and shape("user_side") != (n_users, dim):
            return f"tower_user_side.npy is {shape('user_side')}, expected {(n_users, dim)} (one row a user)"
        return None
    behaviours, slots = entry.get("behaviours"), entry.get("slots")
    if not (isinstance(behaviours, list) and all(isinstance(b, str) for b in behaviours)
            and isinstance(slots, list) and len(slots) == len(behaviours)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in slots)):  # fmt: skip
        return "behaviours and slots: expected two lists of equal length (names, input offsets)"
    power = entry.get("bag_power")
    if isinstance(power, bool) or not isinstance(power, int | float) or not np.isfinite(power):
        return f"bag_power: expected a number, got {power!r:.50}"
    fixed = shape("fixed")
    if fixed is None or len(fixed) != 2 or fixed[0] != n_users or shape("new_user") != (fixed[1],):
        return f"tower_fixed.npy {fixed} and tower_new_user.npy {shape('new_user')}: expected ({n_users}, n) and (n,)"
    if behaviours:
        table = shape("history_table")
        if table is None or len(table) != 2 or table[0] != n_items:
            return f"tower_history_table.npy is {table}, expected ({n_items}, width)"
        if any(s < 0 or s + table[1] > fixed[1] for s in slots):
            return f"slots {slots} do not fit an input of {fixed[1]}"
    return _check_layers(entry, arrays, fixed[1], "", dim)


def _check_layers(entry: dict, arrays: dict[str, np.ndarray], width, prefix: str, dim: int) -> str | None:
    layers = entry.get("layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        return f"layers: expected a positive integer, got {layers!r:.50}"
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        return f"width: expected a non-negative integer, got {width!r:.50}"
    for n in range(layers):
        w, b = arrays.get(f"{prefix}w{n}"), arrays.get(f"{prefix}b{n}")
        w, b = (None if w is None else w.shape), (None if b is None else b.shape)
        if w is None or len(w) != 2 or w[1] != width or b != (w[0],):
            return f"{prefix}w{n} {w} / {prefix}b{n} {b} do not follow an input of {width}"
        width = w[0]
    return None if width == dim else f"the last layer gives {width} numbers, not the artifact's dimension {dim}"


def _check_features(spec, arrays: dict[str, np.ndarray], prefix: str, kind: str, dim: int) -> str | None:
    if not isinstance(spec, dict) or not isinstance(spec.get("columns"), list):
        return f"features: expected {{columns: [...], ...}}, got {spec!r:.100}"
    columns = spec["columns"]
    for c in columns:
        if not (isinstance(c, dict) and isinstance(c.get("name"), str) and c.get("kind") in COLUMN_KINDS):
            return f"features.columns: each needs a name and a kind in {COLUMN_KINDS}, got {c!r:.100}"
        if c["kind"] == "categorical" and not (isinstance(c.get("values"), list) and all(
                isinstance(v, str) for v in c["values"])):  # fmt: skip
            return f"features.columns {c['name']!r}: values must be a list of texts"
        if c["kind"] == "hashed" and not (isinstance(c.get("buckets"), int) and c["buckets"] > 0):
            return f"features.columns {c['name']!r}: buckets must be a positive integer"
        if c["kind"] == "dense" and not all(isinstance(c.get(f), int | float) and np.isfinite(c[f])
                                            for f in ("mean", "std")):  # fmt: skip
            return f"features.columns {c['name']!r}: mean and std must be finite numbers"
    tables = [c for c in columns if c["kind"] != "dense"]
    n_dense = len(columns) - len(tables)
    for j, c in enumerate(tables):
        table = arrays.get(f"{prefix}feat{j}")
        rows = len(c["values"]) if c["kind"] == "categorical" else c.get("buckets", 1)
        if table is None or table.ndim != 2 or table.shape[0] < rows:
            return f"{prefix}feat{j} ({c['name']}) is {None if table is None else table.shape}, expected >= {rows} rows"
        if kind == "graph" and table.shape[1] != dim:
            return f"{prefix}feat{j} ({c['name']}) is {table.shape[1]} wide, expected {dim}"
    if kind == "graph":
        dense = arrays.get(f"{prefix}dense")
        if (dense is None) != (n_dense == 0) or (dense is not None and dense.shape != (n_dense, dim)):
            return f"{prefix}dense is {None if dense is None else dense.shape}, expected ({n_dense}, {dim})"
        if spec.get("parts") != len(tables) + (n_dense > 0):
            return f"features.parts is {spec.get('parts')!r:.20}, expected {len(tables) + (n_dense > 0)}"
        return None
    slots = spec.get("slots")
    if not (isinstance(slots, list) and len(slots) == len(tables) and all(isinstance(s, int) for s in slots)):
        return f"features.slots: expected {len(tables)} input offsets, got {slots!r:.100}"
    if not isinstance(spec.get("dense_slot"), int):
        return f"features.dense_slot: expected an input offset, got {spec.get('dense_slot')!r:.20}"
    return None
