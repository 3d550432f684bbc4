"""`csmf export --onnx`: the user tower and the item table as ONNX graphs, for serving stacks other than csmf's.

Both are built from the artifact's arrays (csmf.serving.online_towers: every stage mask already folded in), so
what onnxruntime computes is what `csmf serve` computes (tested to atol 1e-5). Written to <artifact>/onnx/:

user_tower.onnx  inputs  items (B, L) int64: item rows of the user's history, -1 = padding
                         behaviours (B, L) int64: each item's behaviour, an index into `behaviours` below
                         users (B,) int64: a known user's row (its ID embedding and features), -1 = a new user
                 output  vectors (B, D) float32: raw user vectors (fold objective weights in: q = u * lambda)
item_tower.onnx  inputs  items (B,) int64: item rows      output vectors (B, D) float32
                 (the trained item vectors: an item's vector does not depend on the request)
item_features_tower.onnx (when items have features): a new item's vector from its encoded features
                 inputs  codes (B, T) int64: each table column's code (-1 = unknown)
                         dense (B, n) float32: the dense columns, standardised
                 output  vectors (B, D) float32; towers.json lists the columns and how raw values encode
towers.json      behaviours, item and user ids in row order are in the artifact (item_ids.json, user_ids.json),
                 output_owner (which dimensions each objective scores with), the input and output names

A history lists each (item, behaviour) pair once, as a training history does. Needs `pip install
'csmf[onnx]'` (onnx, onnxscript) to export and onnxruntime to run. The manifest lists each of these files with
its sha256 (`onnx`); `onnx_session` checks a file against it before onnxruntime reads it.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from csmf.serving.artifact import Artifact, onnx_file

logger = logging.getLogger(__name__)


def _placement(width: int, slot: int, n_in: int) -> torch.Tensor:
    """(width, n_in): x @ it puts a width-wide part at columns slot.. of an n_in-wide input."""
    place = torch.zeros(width, n_in)
    place[torch.arange(width), slot + torch.arange(width)] = 1.0
    return place


def _register_layers(module: nn.Module, arrays: dict[str, np.ndarray], prefix: str, n_layers: int) -> None:
    module.n_layers = n_layers
    for n in range(n_layers):
        module.register_buffer(f"w{n}", torch.from_numpy(np.array(arrays[f"{prefix}w{n}"])))
        module.register_buffer(f"b{n}", torch.from_numpy(np.array(arrays[f"{prefix}b{n}"])))


def _folded_mlp(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The layers `_register_layers` gave `module` (masks folded in), relu between them."""
    for n in range(module.n_layers):
        h = h @ getattr(module, f"w{n}").T + getattr(module, f"b{n}")
        if n < module.n_layers - 1:
            h = torch.relu(h)
    return h


class GraphUserTower(nn.Module):
    """u = sum_k (c_k @ V) * [owner == k] (+ a known user's feature part), as csmf.serving.online_towers."""

    def __init__(self, artifact: Artifact):
        super().__init__()
        entry, arrays = artifact.manifest["user_tower"], artifact.tower
        behaviours = list(dict.fromkeys(b for w in entry["stage_weights"] for b in w))
        self.behaviours = behaviours
        weights = [[w.get(b, 0.0) for b in behaviours] for w in entry["stage_weights"]]
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32))  # (S, behaviours)
        self.register_buffer("scale", torch.from_numpy(np.array(arrays["item_scale"])))  # (S, N)
        self.register_buffer("vectors", torch.from_numpy(np.array(artifact.item_vectors)))  # (N, D)
        owner = torch.from_numpy(np.array(artifact.output_owner))
        masks = torch.stack([(owner == k + 1).float() for k in range(len(weights))])
        self.register_buffer("columns", masks)  # (S, D)
        side = arrays.get("user_side")
        side = torch.from_numpy(np.array(side)) if side is not None else torch.zeros(1, owner.numel())
        self.register_buffer("side", side)  # (U, D) known users' feature parts, or one zero row

    def forward(self, items: torch.Tensor, behaviours: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        valid = (items >= 0).float()  # (B, L)
        rows, kinds = items.clamp(min=0), behaviours.clamp(min=0)
        gathered = self.vectors[rows]  # (B, L, D)
        u = torch.zeros(items.shape[0], self.vectors.shape[1])
        for k in range(self.weights.shape[0]):
            w = self.weights[k][kinds] * valid  # (B, L) edge weight of each pair in stage k's graph
            degree = w.sum(dim=1, keepdim=True)
            coef = w * self.scale[k][rows] / degree.clamp(min=1e-12).sqrt()
            u = u + torch.einsum("bl,bld->bd", coef, gathered) * self.columns[k]
        known = (users >= 0).float().unsqueeze(1)
        return u + self.side[users.clamp(min=0) % self.side.shape[0]] * known


class MlpUserTower(nn.Module):
    """x = the user's fixed inputs (or a new user's) + each behaviour's bag in its slot, then the folded MLP."""

    def __init__(self, artifact: Artifact):
        super().__init__()
        entry, arrays = artifact.manifest["user_tower"], artifact.tower
        self.behaviours, self.power = list(entry["behaviours"]), float(entry["bag_power"])
        self.register_buffer("fixed", torch.from_numpy(np.array(arrays["fixed"])))  # (U, n_in)
        self.register_buffer("new_user", torch.from_numpy(np.array(arrays["new_user"])))  # (n_in,)
        n_in = self.fixed.shape[1]
        table = arrays.get("history_table")
        width = table.shape[1] if table is not None else 0
        self.register_buffer("table", torch.from_numpy(np.array(table)) if table is not None else torch.zeros(1, 1))
        places = [_placement(width, slot, n_in) for slot in entry["slots"]]  # bag b -> its slot of the input
        self.register_buffer("places", torch.stack(places) if places else torch.zeros(0, width, n_in))
        _register_layers(self, arrays, "", entry["layers"])

    def forward(self, items: torch.Tensor, behaviours: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        known = (users >= 0).float().unsqueeze(1)
        x = self.fixed[users.clamp(min=0)] * known + self.new_user * (1.0 - known)  # (B, n_in)
        if self.behaviours:
            valid = (items >= 0).float()
            gathered = self.table[items.clamp(min=0)]  # (B, L, H)
            for b in range(len(self.behaviours)):
                mine = valid * (behaviours == b).float()  # (B, L)
                count = mine.sum(dim=1, keepdim=True).clamp(min=1.0)
                bag = torch.einsum("bl,blh->bh", mine, gathered) / count.pow(self.power)
                x = x + bag @ self.places[b]
        return _folded_mlp(self, x)


class ItemFeatureTower(nn.Module):
    """A new item's encoded features -> its vector (csmf.serving.online_towers.ItemTower): codes (B, T) int64 of the
    table columns, -1 = unknown; dense (B, n_dense) float32, standardised (0 = the training mean)."""

    def __init__(self, artifact: Artifact):
        super().__init__()
        entry, arrays = artifact.manifest["item_tower"], artifact.item_tower
        spec = entry["features"]
        self.kind, self.columns = entry["kind"], spec["columns"]
        tables = [c for c in spec["columns"] if c["kind"] != "dense"]
        self.n_tables, self.n_dense = len(tables), len(spec["columns"]) - len(tables)
        for j in range(self.n_tables):
            self.register_buffer(f"t{j}", torch.from_numpy(np.array(arrays[f"ifeat{j}"])))
        if self.kind == "graph":
            self.parts = float(max(spec["parts"], 1))
            dense = arrays.get("idense")
            dense = torch.from_numpy(np.array(dense)) if dense is not None else torch.zeros(0, 1)
            self.register_buffer("dense_map", dense)  # (n_dense, D)
            return
        n_in = entry["width"]
        for j, slot in enumerate(spec["slots"]):  # table j's row -> its slot of the input
            self.register_buffer(f"p{j}", _placement(arrays[f"ifeat{j}"].shape[1], slot, n_in))
        self.register_buffer("dense_place", _placement(self.n_dense, spec["dense_slot"], n_in))
        _register_layers(self, arrays, "i", entry["layers"])

    def forward(self, codes: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        rows = []
        for j in range(self.n_tables):
            table = getattr(self, f"t{j}")
            known = (codes[:, j] >= 0).float().unsqueeze(1)
            rows.append(table[codes[:, j].clamp(min=0)] * known)  # (B, width of table j)
        if self.kind == "graph":
            total = torch.zeros(codes.shape[0], self.t0.shape[1] if self.n_tables else self.dense_map.shape[1])
            for row in rows:
                total = total + row
            if self.n_dense:
                total = total + dense @ self.dense_map
            return total / self.parts
        x = dense @ self.dense_place
        for j, row in enumerate(rows):
            x = x + row @ getattr(self, f"p{j}")
        return _folded_mlp(self, x)


class ItemTable(nn.Module):
    def __init__(self, artifact: Artifact):
        super().__init__()
        self.register_buffer("vectors", torch.from_numpy(np.array(artifact.item_vectors)))

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        return self.vectors[items]


def user_tower_module(artifact: Artifact) -> nn.Module:
    if artifact.tower is None:
        raise ValueError("this artifact has no user tower (exported by an older csmf): export the model again")
    kind = artifact.manifest["user_tower"]["kind"]
    return (GraphUserTower if kind == "graph" else MlpUserTower)(artifact).eval()


def onnx_session(artifact_dir: str | Path, name: str):
    """An onnxruntime session over <artifact>/onnx/<name>, from bytes checked against the manifest's sha256."""
    import onnxruntime

    return onnxruntime.InferenceSession(onnx_file(artifact_dir, name))


def export_onnx(artifact: Artifact, out: str | Path, log=logger.info) -> list[str]:
    """Write user_tower.onnx, item_tower.onnx (item_features_tower.onnx when items have features) and towers.json
    to `out` (a folder); returns the names written (csmf export lists them in the manifest)."""
    try:
        import onnx  # noqa: F401  (torch.onnx needs it)
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'csmf[onnx]'") from err
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    user = user_tower_module(artifact)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed": not needed here
    example = (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, -1]))
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations, not ours to act on
        torch.onnx.export(user, example, out / "user_tower.onnx", input_names=["items", "behaviours", "users"],
                          output_names=["vectors"], dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={"items": {0: batch, 1: length}, "behaviours": {0: batch, 1: length},
                                          "users": {0: batch}})  # fmt: skip
        torch.onnx.export(ItemTable(artifact).eval(), (torch.tensor([0, 1]),), out / "item_tower.onnx",
                          input_names=["items"], output_names=["vectors"], dynamo=True, external_data=False,
                          verbose=False, dynamic_shapes={"items": {0: batch}})  # fmt: skip
        if artifact.item_tower is not None:  # new items from their encoded features
            features = ItemFeatureTower(artifact).eval()
            example = (torch.zeros(2, features.n_tables, dtype=torch.long), torch.zeros(2, features.n_dense))
            torch.onnx.export(features, example, out / "item_features_tower.onnx", input_names=["codes", "dense"],
                              output_names=["vectors"], dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes={"codes": {0: batch}, "dense": {0: batch}})  # fmt: skip
    kind = artifact.manifest["user_tower"]["kind"]
    meta = {"user_tower": {"kind": kind, "inputs": ["items", "behaviours", "users"],
                           "behaviours": list(user.behaviours), "output": "vectors"},
            "item_tower": {"inputs": ["items"], "output": "vectors"},
            "item_features_tower": None if artifact.item_tower is None else {
                "inputs": ["codes", "dense"], "output": "vectors",
                "columns": artifact.manifest["item_tower"]["features"]["columns"]},
            "output_owner": np.asarray(artifact.output_owner).tolist(), "stages": list(artifact.stages)}  # fmt: skip
    (out / "towers.json").write_text(json.dumps(meta, indent=2))
    names = ["user_tower.onnx", "item_tower.onnx", "towers.json"]
    names += ["item_features_tower.onnx"] if artifact.item_tower is not None else []
    log(f"wrote {out}: {', '.join(names)}")
    return names
