"""`csmf export`: a trained run folder -> a self-describing serving artifact (no pickle anywhere).

Artifact folder:
  manifest.json        format and version, csmf/numpy versions, dataset, stages, dimension groups, default
                       weights, shapes, and the sha256 of every file below
  item_vectors.npy     (N, D) float32: one vector per item for every objective
  user_vectors.npy     (U, D) float32: each user's raw vector from their training history (weights are
                       folded in per request: q = u * lambda, see csmf.fusion)
  output_owner.npy     (D,) int: the stage that owns each output dimension (objective k uses owners 1..k)
  seen_indptr.npy, seen_indices.npy   CSR of the items each user already has (for exclude_seen)
  popularity.npy       (N,) float32 training interactions per item (the unknown-user fallback)
  user_ids.json, item_ids.json        original ids, in index order

Loading checks the format version and every checksum before anything is used, and names what is wrong.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

FORMAT = "csmf-serving"
FORMAT_VERSION = 1
ARRAYS = ("item_vectors", "user_vectors", "output_owner", "seen_indptr", "seen_indices", "popularity")
JSONS = ("user_ids", "item_ids")


class ArtifactError(ValueError):
    """A serving artifact that is missing, damaged, or of another format version."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Artifact:
    """What a server needs: vectors, dimension groups, ids, seen items, popularity, default weights."""

    item_vectors: np.ndarray  # (N, D) float32
    user_vectors: np.ndarray  # (U, D) float32
    output_owner: np.ndarray  # (D,) int
    seen_indptr: np.ndarray
    seen_indices: np.ndarray
    popularity: np.ndarray  # (N,)
    user_ids: list[str]
    item_ids: list[str]
    stages: tuple[str, ...]
    default_weights: dict[str, float]
    manifest: dict

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    def seen(self, user: int) -> np.ndarray:
        return self.seen_indices[self.seen_indptr[user] : self.seen_indptr[user + 1]]

    def fold(self, weights: dict[str, float]) -> np.ndarray:
        """(D,) lambda: <u * lambda, v> = sum_k w_k s_k(u, v) (csmf.fusion, in numpy)."""
        lam = np.zeros(self.dim, dtype=np.float32)
        for name, w in weights.items():
            lam += np.float32(w) * self.objective_mask(name)
        return lam

    def objective_mask(self, stage: str) -> np.ndarray:
        k = self.stages.index(stage) + 1
        return ((self.output_owner >= 1) & (self.output_owner <= k)).astype(np.float32)


def write_artifact(
    out: str | Path,
    item_vectors: np.ndarray,
    user_vectors: np.ndarray,
    output_owner: np.ndarray,
    seen_indptr: np.ndarray,
    seen_indices: np.ndarray,
    popularity: np.ndarray,
    user_ids: list[str],
    item_ids: list[str],
    stages: tuple[str, ...],
    default_weights: dict[str, float],
    source: dict,
) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arrays = {
        "item_vectors": np.ascontiguousarray(item_vectors, dtype=np.float32),
        "user_vectors": np.ascontiguousarray(user_vectors, dtype=np.float32),
        "output_owner": np.asarray(output_owner, dtype=np.int64),
        "seen_indptr": np.asarray(seen_indptr, dtype=np.int64),
        "seen_indices": np.asarray(seen_indices, dtype=np.int64),
        "popularity": np.asarray(popularity, dtype=np.float32),
    }
    files = {}
    for name, array in arrays.items():
        np.save(out / f"{name}.npy", array, allow_pickle=False)
        files[f"{name}.npy"] = _sha256(out / f"{name}.npy")
    for name, values in (("user_ids", user_ids), ("item_ids", item_ids)):
        (out / f"{name}.json").write_text(json.dumps([str(v) for v in values]))
        files[f"{name}.json"] = _sha256(out / f"{name}.json")
    n_items, dim = arrays["item_vectors"].shape
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"csmf": _version("csmf"), "numpy": np.__version__},
        "stages": list(stages),
        "default_weights": default_weights,
        "dim": int(dim),
        "n_items": int(n_items),
        "n_users": int(arrays["user_vectors"].shape[0]),
        "dimension_groups": {s: int((arrays["output_owner"] == k + 1).sum()) for k, s in enumerate(stages)},
        "source": source,
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def load_artifact(path: str | Path) -> Artifact:
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise ArtifactError(f"{path}: no manifest.json here; is this a folder written by `csmf export`?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r}; this csmf reads version "
            f"{FORMAT_VERSION}: export the model again with this csmf"
        )
    expected = {f"{n}.npy" for n in ARRAYS} | {f"{n}.json" for n in JSONS}
    files = manifest.get("files", {})
    if set(files) != expected:
        raise ArtifactError(f"{manifest_path}: lists files {sorted(files)}, expected {sorted(expected)}")
    for name, digest in files.items():
        file = path / name
        if not file.exists():
            raise ArtifactError(f"{file}: missing from the artifact")
        if _sha256(file) != digest:
            raise ArtifactError(f"{file}: checksum does not match the manifest (the file changed or is damaged)")
    arrays = {n: np.load(path / f"{n}.npy", allow_pickle=False) for n in ARRAYS}
    ids = {n: json.loads((path / f"{n}.json").read_text()) for n in JSONS}
    n_items, n_users = len(ids["item_ids"]), len(ids["user_ids"])
    if arrays["item_vectors"].shape != (n_items, manifest["dim"]) or arrays["user_vectors"].shape[0] != n_users:
        raise ArtifactError(f"{path}: vector shapes do not match the id lists and the manifest's dim")
    stages, weights = tuple(manifest["stages"]), manifest["default_weights"]
    return Artifact(**arrays, **ids, stages=stages, default_weights=weights, manifest=manifest)


def _ids(original: np.ndarray | None, n: int) -> list[str]:
    return [str(v) for v in (original if original is not None else range(n))]


def export_run(
    run_dir: str | Path, out: str | Path, default_weights: dict[str, float] | None = None, log=print
) -> Path:
    """Write the serving artifact of a finished `csmf train` run folder (its config.toml and checkpoints)."""
    import torch

    from csmf.bench import load_dataset
    from csmf.cascade import CascadeTrainer
    from csmf.config import load_config
    from csmf.data.schema import union

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise ArtifactError(f"{run_dir}: no config.toml; give the folder `csmf train --out` wrote")
    cfg = load_config(run_dir / "config.toml")
    data = load_dataset(cfg)
    trainer = CascadeTrainer(data, cfg, run_dir=run_dir / "checkpoints", log=log)
    if trainer.resume_point() != len(trainer.phases):
        raise ArtifactError(f"{run_dir}: training has not finished; rerun `csmf train --out {run_dir}` to finish it")
    history = data.train | data.side
    trained = trainer.retriever(history)
    users = np.arange(data.n_users)
    user_vectors = torch.cat([trained.raw_user_vectors(users[i : i + 4096]) for i in range(0, len(users), 4096)])
    seen = union(*history.values()).tocsr()
    seen.sort_indices()
    weights = default_weights or {s: 1.0 for s in data.stages}
    unknown = [s for s in weights if s not in data.stages]
    if unknown:
        raise ArtifactError(f"default weights name {unknown}, not stages of {data.name} {data.stages}")
    path = write_artifact(
        out,
        item_vectors=trained.items.numpy(),
        user_vectors=user_vectors.numpy(),
        output_owner=trained.model.output_owner.numpy(),
        seen_indptr=seen.indptr,
        seen_indices=seen.indices,
        popularity=np.asarray(seen.sum(axis=0)).ravel(),
        user_ids=_ids(data.user_ids, data.n_users),
        item_ids=_ids(data.item_ids, data.n_items),
        stages=data.stages,
        default_weights=weights,
        source={"run_dir": str(run_dir), "dataset": data.name, "seed": cfg.seed},
    )
    log(f"wrote {path}: {data.n_items:,} item vectors of dimension {trained.items.shape[1]}, {data.n_users:,} users")
    return path
