"""The serving artifact: its format, how it is written, and how loading checks every byte of it (no pickle).
`csmf export` (csmf.serving.export) writes one from a trained model; `csmf serve` loads it.

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
  tower_*.npy          the user tower with its stage masks folded in (csmf.serving.online_towers): a history and
                       features -> a user vector at serving time; described by the manifest's `user_tower`
  itower_*.npy         the item tower, when items have features: raw features -> a new item's vector
                       (manifest `item_tower`)
  onnx/                with `csmf export --onnx`: the towers as ONNX graphs and towers.json, each listed with
                       its sha256 in the manifest's `onnx` (checked by `onnx_file` before anything reads it)

The manifest carries `manifest_sha256`, a digest of its own canonical JSON (every key but that one, sorted,
compact), so the file digests, stages, dimension groups and default weights are all covered. A checksum is
not a signature: it catches damage and hand edits, not someone who rewrites it. So loading also checks the
content: format version, every checksum, every array read without pickle (dtype, shape), vectors finite and
within +-MAX_ABS, stage names against the dimension groups the owners give, default weights by the same
rules as a request's, seen indices within the catalogue, ids unique. Every failure is an ArtifactError that
names the file and the field. Artifacts of format version 1 (no manifest checksum) are refused with the
command that exports them again: their manifest cannot be verified.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import numpy as np

from csmf.fusion import WeightError, check_weights, clip, fold_named
from csmf.hashing import file_sha256

FORMAT = "csmf-serving"
FORMAT_VERSION = 2  # 2: the manifest checksums itself (manifest_sha256) and its content is validated at load
ARRAYS = ("item_vectors", "user_vectors", "output_owner", "seen_indptr", "seen_indices", "popularity")
JSONS = ("user_ids", "item_ids")
TOWERS = {"user_tower": "tower_", "item_tower": "itower_"}  # manifest entry -> its arrays' file prefix
ONNX_DIR = "onnx"  # `csmf export --onnx` writes here, inside the artifact
MAX_ABS = 1e6  # bound on every vector entry, served or sent: scores stay finite in float32 (D * 1e6 * 1e6 * S)


class ArtifactError(ValueError):
    """A serving artifact that is missing, damaged, or of another format version."""


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, compact, ASCII), without manifest_sha256 itself."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


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
    tower: dict[str, np.ndarray] | None = None  # the user tower's arrays (manifest["user_tower"] says which)
    item_tower: dict[str, np.ndarray] | None = None  # the item tower's (manifest["item_tower"]), if items have features

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    def seen(self, user: int) -> np.ndarray:
        return self.seen_indices[self.seen_indptr[user] : self.seen_indptr[user + 1]]

    def fold(self, weights: dict[str, float]) -> np.ndarray:
        """(D,) lambda: <u * lambda, v> = sum_k w_k s_k(u, v) (csmf.fusion)."""
        return fold_named(self.output_owner, tuple(self.stages), weights)

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
    user_tower: tuple[dict, dict[str, np.ndarray]] | None = None,
    item_tower: tuple[dict, dict[str, np.ndarray]] | None = None,
) -> Path:
    """user_tower, item_tower: (manifest entry, arrays) of Backbone.export_towers, or None."""
    out = Path(out)
    try:
        check_weights(default_weights, tuple(stages))
    except WeightError as err:
        raise ArtifactError(f"default weights {clip(repr(default_weights))}: {err}") from None
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
    towers = {}
    for key, prefix, given in (("user_tower", "tower_", user_tower), ("item_tower", "itower_", item_tower)):
        if given is not None:
            towers[key] = {f"{prefix}{n}": np.ascontiguousarray(a, dtype=np.float32) for n, a in given[1].items()}
    tower = {n: a for named in towers.values() for n, a in named.items()}
    for name, array in (arrays | tower).items():
        np.save(out / f"{name}.npy", array, allow_pickle=False)
        files[f"{name}.npy"] = file_sha256(out / f"{name}.npy")
    for name, values in (("user_ids", user_ids), ("item_ids", item_ids)):
        (out / f"{name}.json").write_text(json.dumps([str(v) for v in values]))
        files[f"{name}.json"] = file_sha256(out / f"{name}.json")
    n_items, dim = arrays["item_vectors"].shape
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "versions": {"csmf": _version("csmf"), "numpy": np.__version__},
        "stages": list(stages),
        "default_weights": {s: float(w) for s, w in default_weights.items()},
        "dim": int(dim),
        "n_items": int(n_items),
        "n_users": int(arrays["user_vectors"].shape[0]),
        "dimension_groups": {s: int((arrays["output_owner"] == k + 1).sum()) for k, s in enumerate(stages)},
        "source": source,
        "files": files,
    }
    for key, given in (("user_tower", user_tower), ("item_tower", item_tower)):
        if given is not None:
            manifest[key] = {**given[0], "arrays": sorted(towers[key])}
    manifest = json.loads(json.dumps(manifest))  # the digest is of what a reader gets back (tuples -> lists)
    manifest["manifest_sha256"] = manifest_digest(manifest)
    ids = {"user_ids": [str(v) for v in user_ids], "item_ids": [str(v) for v in item_ids]}
    _validate(out / "manifest.json", manifest, arrays | tower, ids)  # refuse to write what loading would refuse
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def load_artifact(path: str | Path, mmap: bool = False) -> Artifact:
    """The artifact at `path`, every file checked. `mmap`: the arrays are read-only memory maps of the files, so
    several server processes (csmf serve --workers) share one copy in the page cache; the folder must then not be
    written while it is served."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.exists():
        raise ArtifactError(f"{path}: no manifest.json here; is this a folder written by `csmf export`?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({err})") from err
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: holds a {type(manifest).__name__}, expected a JSON object")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: format {clip(repr(manifest.get('format')))}, expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        run = manifest.get("source", {}).get("run_dir", "RUN") if isinstance(manifest.get("source"), dict) else "RUN"
        raise ArtifactError(
            f"{manifest_path}: format_version {clip(repr(manifest.get('format_version')))}; this csmf reads version "
            f"{FORMAT_VERSION} (a manifest checksum and checked content): export the model again with this csmf: "
            f"csmf export --run {run} --out {path}"
        )
    try:
        digest = manifest_digest(manifest)
    except ValueError as err:  # NaN or Infinity somewhere: not canonical JSON
        raise ArtifactError(f"{manifest_path}: holds a value JSON cannot write ({err})") from err
    if manifest.get("manifest_sha256") != digest:
        raise ArtifactError(f"{manifest_path}: manifest_sha256 does not match the manifest's content (it was "
                            "edited or damaged); export the model again rather than editing the manifest")  # fmt: skip
    tower_arrays = []
    for key, prefix in TOWERS.items():
        tower = manifest.get(key)
        names = tower.get("arrays") if isinstance(tower, dict) else None
        named_well = isinstance(names, list) and all(
            isinstance(n, str) and n.startswith(prefix) and n.replace("_", "").isalnum() for n in names
        )
        if tower is not None and not named_well:
            raise ArtifactError(f"{manifest_path}: {key}.arrays: expected a list of {prefix}* names, got "
                                f"{clip(repr(names))}")  # fmt: skip
        tower_arrays += names or []
    expected = {f"{n}.npy" for n in (*ARRAYS, *(tower_arrays or ()))} | {f"{n}.json" for n in JSONS}
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != expected:
        raise ArtifactError(f"{manifest_path}: files lists {clip(repr(files))}, expected {sorted(expected)}")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():  # checked before reading: a FIFO would block the read forever
            raise ArtifactError(f"{file}: {_not_a_file(file)}")
        if file_sha256(file) != digest:
            raise ArtifactError(f"{file}: checksum does not match the manifest (the file changed or is damaged)")
    arrays = {n: _read_array(path / f"{n}.npy", mmap) for n in ARRAYS}
    tower_data = {n: _read_array(path / f"{n}.npy", mmap) for n in tower_arrays or ()}
    ids = {n: _read_ids(path / f"{n}.json") for n in JSONS}
    _validate(manifest_path, manifest, arrays | tower_data, ids)
    stages, weights = tuple(manifest["stages"]), manifest["default_weights"]
    found = {key: {n.removeprefix(prefix): a for n, a in tower_data.items() if n.startswith(prefix)}
             if key in manifest else None for key, prefix in TOWERS.items()}  # fmt: skip
    return Artifact(**arrays, **ids, stages=stages, default_weights=weights, manifest=manifest,
                    tower=found["user_tower"], item_tower=found["item_tower"])  # fmt: skip


def _not_a_file(file: Path) -> str:
    """What stands at `file` instead of a regular file, and the fix."""
    try:
        mode = file.lstat().st_mode
    except OSError:
        return "missing from the artifact; export the model again"
    if stat.S_ISLNK(mode):
        return "a symbolic link to nothing (or to no regular file); put the file itself there, or export again"
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISDIR, "a directory"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))  # fmt: skip
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    return f"{kind}, not a regular file as `csmf export` writes; remove it and export the model again"


def record_onnx(path: str | Path, names: list[str]) -> dict:
    """List the files `csmf export --onnx` wrote to <artifact>/onnx in the artifact's manifest (`onnx`: name ->
    sha256) and sign the manifest again; returns the new manifest."""
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["onnx"] = {name: file_sha256(path / ONNX_DIR / name) for name in sorted(names)}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    partial = path / "manifest.json.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(path / "manifest.json")  # the old manifest or the new one, never half of one
    return manifest


def onnx_file(path: str | Path, name: str) -> bytes:
    """The bytes of <artifact>/onnx/<name>, checked against the sha256 the manifest lists (ArtifactError naming
    the file otherwise). Reading the bytes once, then checking them, means what is checked is what is used."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        signed = isinstance(manifest, dict) and manifest.get("manifest_sha256") == manifest_digest(manifest)
    except (OSError, ValueError) as err:  # unreadable, not JSON, or NaN somewhere (not canonical JSON)
        raise ArtifactError(f"{manifest_path}: not a readable manifest ({err}); export the model again") from None
    if not signed:
        raise ArtifactError(f"{manifest_path}: manifest_sha256 does not match the manifest's content (it was "
                            "edited or damaged); export the model again")  # fmt: skip
    listed = manifest.get("onnx")
    file = path / ONNX_DIR / name
    if not isinstance(listed, dict) or name not in listed:
        raise ArtifactError(f"{file}: not listed in {manifest_path} (`onnx`), so nothing vouches for it; export "
                            "the model again with `csmf export --onnx`")  # fmt: skip
    if not file.is_file():
        raise ArtifactError(f"{file}: {_not_a_file(file)}")
    data = file.read_bytes()
    if hashlib.sha256(data).hexdigest() != listed[name]:
        raise ArtifactError(f"{file}: checksum does not match the manifest (the file changed or is damaged); "
                            "export the model again with `csmf export --onnx`")  # fmt: skip
    return data


def _read_array(file: Path, mmap: bool = False) -> np.ndarray:
    """One .npy array, never unpickled: a pickle, an .npz, a cut or padded file is an ArtifactError naming it.
    `mmap`: a read-only memory map of the file (nothing read into this process's memory)."""
    try:
        if mmap:
            array = np.load(file, mmap_mode="r", allow_pickle=False)  # refuses object arrays; a cut file fails
            trailing = file.stat().st_size > array.offset + array.nbytes
        else:
            with open(file, "rb") as f:
                array = np.lib.format.read_array(f, allow_pickle=False)
                trailing = f.read(1)
    except (ValueError, EOFError, OSError) as err:  # numpy says what it found: pickled data, a short read, ...
        raise ArtifactError(f"{file}: not a readable .npy array ({clip(str(err), 200)}); export again") from err
    if trailing:
        raise ArtifactError(f"{file}: has bytes after the array it declares (damaged); export again")
    return array


def _read_ids(file: Path) -> list[str]:
    try:
        ids = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{file}: not valid JSON ({err}); export again") from err
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ArtifactError(f"{file}: expected a JSON list of strings (ids in index order); export again")
    if len(set(ids)) != len(ids):
        repeated = next(i for i, n in Counter(ids).items() if n > 1)
        raise ArtifactError(f"{file}: id {clip(repr(repeated))} appears more than once; ids must be unique")
    return ids


def _validate(manifest_path: Path, manifest: dict, arrays: dict[str, np.ndarray], ids: dict[str, list[str]]) -> None:
    """Every field of the manifest against the arrays and ids it describes; the first problem found is raised."""

    def fail(field: str, problem: str) -> NoReturn:
        raise ArtifactError(f"{manifest_path}: {field}: {problem}; export the model again with `csmf export`")

    stages = manifest.get("stages")
    if not (isinstance(stages, list) and stages and all(isinstance(s, str) and s for s in stages)):
        fail("stages", f"expected a non-empty list of stage names, got {clip(repr(stages))}")
    if len(set(stages)) != len(stages):
        fail("stages", f"a stage name appears twice in {stages}")
    for field in ("dim", "n_items", "n_users"):
        value = manifest.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if field == "n_users" else 1):
            least = "non-negative" if field == "n_users" else "positive"
            fail(field, f"expected a {least} integer, got {clip(repr(value))}")
    dim, n_items, n_users = manifest["dim"], manifest["n_items"], manifest["n_users"]

    def array(name: str, kind: str, shape: tuple[int, ...]) -> np.ndarray:
        a = arrays[name]
        file = f"{name}.npy"
        if a.dtype.kind != kind or (kind == "f" and a.dtype != np.float32) or a.dtype.byteorder == ">":
            fail(file, f"dtype {a.dtype}, expected {'float32' if kind == 'f' else 'native integers'}")
        if a.shape != shape:
            fail(file, f"shape {a.shape}, expected {shape} (dim {dim}, n_items {n_items}, n_users {n_users})")
        return a

    n_stages = len(stages)
    for name, rows in (("item_vectors", n_items), ("user_vectors", n_users)):
        v = array(name, "f", (rows, dim))
        if not np.isfinite(v).all():
            fail(f"{name}.npy", f"row {int(np.nonzero(~np.isfinite(v).all(axis=1))[0][0])} is not finite (NaN or inf)")
        if v.size and np.abs(v).max() > MAX_ABS:
            fail(f"{name}.npy", f"holds {float(np.abs(v).max()):g}, beyond +-{MAX_ABS:g} (scores would overflow)")
    owner = array("output_owner", "i", (dim,))
    if owner.size and (owner.min() < 0 or owner.max() > n_stages):
        fail("output_owner.npy", f"owners lie in 0 (unused) to {n_stages} (stages), got {owner.min()}..{owner.max()}")
    groups = {s: int((owner == k + 1).sum()) for k, s in enumerate(stages)}
    if manifest.get("dimension_groups") != groups:
        given = clip(repr(manifest.get("dimension_groups")))
        fail("dimension_groups", f"{given} but output_owner gives {groups} for stages {stages}")
    if groups[stages[0]] == 0:
        fail("dimension_groups", f"the first stage {stages[0]!r} owns no dimension: every objective would score 0")
    indptr = array("seen_indptr", "i", (n_users + 1,))
    indices = arrays["seen_indices"]
    if indices.ndim != 1 or indices.dtype.kind != "i":
        fail("seen_indices.npy", f"expected a 1-D integer array, got {indices.dtype} of shape {indices.shape}")
    if indptr[0] != 0 or indptr[-1] != len(indices) or (np.diff(indptr) < 0).any():
        fail("seen_indptr.npy", f"not a CSR row pointer over {len(indices)} seen items (must start at 0, never "
             "decrease, end at the number of seen items)")  # fmt: skip
    if len(indices) and (indices.min() < 0 or indices.max() >= n_items):
        fail("seen_indices.npy", f"item rows must lie in 0..{n_items - 1}, got {indices.min()}..{indices.max()}")
    popularity = array("popularity", "f", (n_items,))
    if not np.isfinite(popularity).all() or (popularity < 0).any():
        fail("popularity.npy", "must be finite and >= 0 (training interactions per item)")
    for name, n in (("user_ids", n_users), ("item_ids", n_items)):
        if len(ids[name]) != n:
            fail(f"{name}.json", f"{len(ids[name])} ids, expected {n}")
    try:
        check_weights(manifest.get("default_weights"), tuple(stages))
    except WeightError as err:
        fail("default_weights", str(err))
    for key, prefix in TOWERS.items():
        _validate_tower(fail, key, prefix, manifest.get(key), arrays, n_users, n_items, dim)


def _validate_tower(fail, key: str, prefix: str, tower: dict | None, arrays: dict[str, np.ndarray], n_users: int,
                    n_items: int, dim: int) -> None:  # fmt: skip
    """A tower's description against its arrays: kind, float32, finite, and the shapes it implies."""
    if tower is None:
        return
    from csmf.serving.online_towers import TOWER_KINDS, check_tower

    if tower.get("kind") not in TOWER_KINDS:
        fail(f"{key}.kind", f"expected one of {TOWER_KINDS}, got {clip(repr(tower.get('kind')))}")
    named = {n.removeprefix(prefix): arrays[n] for n in tower["arrays"]}
    for name, a in named.items():
        if a.dtype != np.float32 or not np.isfinite(a).all():
            fail(f"{prefix}{name}.npy", "must hold finite float32 numbers")
    try:
        problem = check_tower(tower, named, n_users, n_items, dim, key.removesuffix("_tower"))
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # a field of the wrong type or missing
        problem = f"malformed ({type(err).__name__}: {clip(str(err), 120)})"
    if problem:
        fail(key, problem)
