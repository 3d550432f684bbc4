"""The user tower in the serving artifact: a user's behaviour history -> the user's vector, with numpy alone.

`csmf export` writes the trained user tower at its top stage with every stage mask folded in (a weight no
objective uses is 0), so a server computes the vector of a user it has never seen, or of a known user's
latest history, without torch and without retraining. Weights fold in afterwards, as for precomputed users.

graph encoder (csmf.graph): u = sum_k (c_k @ V) * [owner == k] (+ the known user's feature part), where V is
  the served item matrix (the sum of the stages' smoothed item layers, which own disjoint columns) and c_k is
  the user's normalised row of stage k's graph: c_k[i] = a_k[i] * s_k[i] / sqrt(sum_j a_k[j]), a_k[i] =
  sum over behaviours b of w_kb * [i in history_b], s_k = 1 / sqrt(item degree) in stage k's training graph.
mlp encoder (csmf.towers): x = the user's fixed inputs (ID embedding, features, unknown context; zeros for a
  new user) with each behaviour's bag (sum of the history table's rows / count ** bag_power) in its slot,
  then the masked MLP: relu between layers.
"""

from __future__ import annotations

import numpy as np

TOWER_KINDS = ("graph", "mlp")


def tower_of(trained) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest entry, arrays) of a TrainedCascade's user tower at its top stage, masks folded in."""
    import torch

    from csmf.cascade import evaluating
    from csmf.graph import GraphTwoTower
    from csmf.masks import active, usable

    model, top = trained.model, trained.top
    users = torch.arange(next(iter(trained.history.values())).shape[0])
    with torch.no_grad(), evaluating(model):
        if isinstance(model, GraphTwoTower):
            arrays = {"item_scale": np.stack([g.item_scale for g in model.graphs[:top]]).astype(np.float32)}
            side = model._user_side(users)
            if side is not None:  # the known users' feature part (a new user has none)
                arrays["user_side"] = (side * model.group_mask(top)).numpy().astype(np.float32)
            weights = [{b: float(w) for b, w in model.stage_weights[k].items()} for k in range(top)]
            return {"kind": "graph", "stage_weights": weights}, arrays
        tower = model.user
        width = tower.history.weight.shape[1] if tower.history is not None else 0
        parts = [(tower.id_emb(users, top), True)]  # (inputs of every known user, whether only they have it)
        slots = []  # where each behaviour's bag goes in the input
        for _ in model.behaviours if tower.history is not None else ():
            slots.append(sum(p.shape[1] for p, _ in parts))
            parts.append((torch.zeros(len(users), width), False))
        parts += [(tower.features.lookup(n, users, e.weight) * e.column_mask(top), True)
                  for n, e in tower.feat_emb.items()]  # fmt: skip
        parts += [(e(torch.zeros_like(users), top), False) for e in tower.ctx_emb.values()]  # context unknown
        if tower.features.dense is not None:
            parts.append((tower.features.dense[users], True))
        fixed = torch.cat([p for p, _ in parts], dim=1)
        new_user = torch.cat([p[0] * (0.0 if known else 1.0) for p, known in parts])  # no ID, no features
        arrays = {"fixed": fixed.numpy().astype(np.float32), "new_user": new_user.numpy().astype(np.float32)}
        if tower.history is not None:
            arrays["history_table"] = (tower.history.weight * tower.history.column_mask(top)).numpy().astype(np.float32)
        owner_in = tower.input_owner()
        for n, layer in enumerate(tower.layers):
            arrays[f"w{n}"] = (layer.weight * usable(layer.owner, owner_in, top).float()).numpy().astype(np.float32)
            arrays[f"b{n}"] = (layer.bias * active(layer.owner, top).float()).numpy().astype(np.float32)
            owner_in = layer.owner
        entry = {"kind": "mlp", "behaviours": list(model.behaviours) if tower.history is not None else [],
                 "slots": slots, "bag_power": float(model.bag_power), "layers": len(tower.layers)}  # fmt: skip
        return entry, arrays


class UserTower:
    """A user's history (item rows per behaviour) -> the raw user vector, as the trained tower computes it."""

    def __init__(self, entry: dict, arrays: dict[str, np.ndarray], item_vectors: np.ndarray, owner: np.ndarray):
        self.kind, self.entry, self.arrays = entry["kind"], entry, arrays
        self.item_vectors, self.owner = item_vectors, owner
        if self.kind == "graph":
            self.behaviours = tuple(dict.fromkeys(b for w in entry["stage_weights"] for b in w))
            self.n_items = arrays["item_scale"].shape[1]
        else:
            self.behaviours = tuple(entry["behaviours"])
            self.n_items = arrays["history_table"].shape[0] if "history_table" in arrays else 0

    def vector(self, history: dict[str, np.ndarray], user_row: int | None = None) -> np.ndarray:
        """(D,) float32. history: behaviour -> distinct item rows (< n_items); user_row: a known user's row (its
        ID embedding and features), None for a new user."""
        if self.kind == "graph":
            return self._graph(history, user_row)
        return self._mlp(history, user_row)

    def _graph(self, history: dict[str, np.ndarray], user_row: int | None) -> np.ndarray:
        u = np.zeros(self.item_vectors.shape[1], dtype=np.float32)
        scale = self.arrays["item_scale"]
        for k, weights in enumerate(self.entry["stage_weights"]):
            columns = self.owner == k + 1
            if not columns.any():
                continue
            a: dict[int, float] = {}
            for b, w in weights.items():
                for i in history.get(b, ()):
                    a[int(i)] = a.get(int(i), 0.0) + w
            degree = sum(a.values())
            if degree <= 0:
                continue
            rows = np.fromiter(a.keys(), dtype=np.int64, count=len(a))
            coef = np.fromiter(a.values(), dtype=np.float64, count=len(a)) * scale[k, rows] / np.sqrt(degree)
            u[columns] += coef.astype(np.float32) @ self.item_vectors[rows][:, columns]
        if user_row is not None and "user_side" in self.arrays:
            u += self.arrays["user_side"][user_row]
        return u

    def _mlp(self, history: dict[str, np.ndarray], user_row: int | None) -> np.ndarray:
        a = self.arrays
        x = (a["fixed"][user_row] if user_row is not None else a["new_user"]).copy()
        table = a.get("history_table")
        power = self.entry["bag_power"]
        for b, slot in zip(self.behaviours, self.entry["slots"], strict=True):
            rows = np.asarray(history.get(b, ()), dtype=np.int64)
            if len(rows):
                x[slot : slot + table.shape[1]] = table[rows].sum(axis=0) / max(len(rows), 1) ** power
        h = x
        for n in range(self.entry["layers"]):
            h = a[f"w{n}"] @ h + a[f"b{n}"]
            if n < self.entry["layers"] - 1:
                h = np.maximum(h, 0.0)
        return h.astype(np.float32)


def check_tower(entry: dict, arrays: dict[str, np.ndarray], n_users: int, n_items: int) -> str | None:
    """What is wrong with a tower's description and arrays (their shapes against each other and the artifact's
    users and items), or None."""

    def shape(name: str) -> tuple[int, ...] | None:
        return arrays[name].shape if name in arrays else None

    if entry["kind"] == "graph":
        weights = entry.get("stage_weights")
        if not (isinstance(weights, list) and weights and all(
                isinstance(w, dict) and all(isinstance(b, str) and isinstance(v, int | float) and not isinstance(
                    v, bool) and v >= 0 for b, v in w.items()) for w in weights)):  # fmt: skip
            return f"stage_weights: expected a list of {{behaviour: weight >= 0}}, got {weights!r:.200}"
        if shape("item_scale") != (len(weights), n_items):
            return f"tower_item_scale.npy is {shape('item_scale')}, expected {(len(weights), n_items)}"
        if "user_side" in arrays and shape("user_side")[0] != n_users:
            return f"tower_user_side.npy has {shape('user_side')[0]} rows, expected {n_users} (one a user)"
        return None
    behaviours, slots, layers = entry.get("behaviours"), entry.get("slots"), entry.get("layers")
    if not (isinstance(behaviours, list) and all(isinstance(b, str) for b in behaviours)
            and isinstance(slots, list) and len(slots) == len(behaviours)
            and all(isinstance(s, int) and not isinstance(s, bool) for s in slots)):  # fmt: skip
        return "behaviours and slots: expected two lists of equal length (names, input offsets)"
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        return f"layers: expected a positive integer, got {layers!r:.50}"
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
    width = fixed[1]
    for n in range(layers):
        w, b = shape(f"w{n}"), shape(f"b{n}")
        if w is None or len(w) != 2 or w[1] != width or b != (w[0],):
            return f"tower_w{n}.npy {w} / tower_b{n}.npy {b} do not follow an input of {width}"
        width = w[0]
    return None
