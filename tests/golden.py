"""Golden fits: tiny trainings of every neural model path, whose metrics and weights a refactor must keep.

Each case trains one model on a small simulated cascade (with item features and scenario context, so every
input path runs) and records its test metrics and a digest of its final weights. `tests/golden.json` holds
the record of the current code; tests/test_golden.py refits every case and compares, so a change that moves
a number fails until it is explained and the record is written again:

    python tests/golden.py --write     # after a change that moves numbers on purpose (say so in the commit)
    python tests/golden.py             # compare, case by case, and print what moved

The record is of this machine's CPU build of torch (torch==2.13.0, one intra-op thread); digests of float
weights are not portable across CPUs with other vector units.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from csmf.config import Config, override
from csmf.data.datasets import load_dataset
from csmf.evaluation import evaluate
from csmf.models.csmf import CSMF
from csmf.models.multitask import MultiTask

RECORD = Path(__file__).with_name("golden.json")
SIM = ["data.dataset=sim", "sim.n_users=300", "sim.n_items=200", "sim.item_features=2", "sim.scenarios=3",
       "sim.exposures_per_user=30"]  # fmt: skip
SMALL = ["model.dim=16", "model.id_dim=16", "model.history_dim=16", "model.feature_dim=8", "train.max_epochs=2",
         "train.batch_size=256", "train.user_batch_size=128", "train.extra_negatives=64", "multitask.expert_dim=16",
         "multitask.kernel_dim=8", "multitask.max_epochs=2", "multitask.patience=4"]  # fmt: skip
# the multi-task towers at the learning rate they had when they shared train.lr (the records predate multitask.lr)
GRAPH = [*SMALL, "train.distill=ease", "ease.l2=100", "multitask.lr=0.01"]
MLP = [*SMALL, "model.encoder=mlp", "train.lr=0.003", "multitask.lr=0.003", "train.full_softmax_max_items=0",
       "train.distill=", "train.aux_weight=0", "cascade.min_share=0"]  # fmt: skip

# name -> (model, config overrides on top of the sim data)
CASES: dict[str, tuple[str, list[str]]] = {
    "graph-csmf": ("csmf", GRAPH),
    "graph-aml-weight": ("csmf", [*GRAPH, "cascade.aml_form=weight"]),
    "graph-aml-hinge": ("csmf", [*GRAPH, "cascade.aml_form=hinge"]),
    # past the full-softmax limit: neighbour operators (fit_to_size), the pooled per-user loss with its teacher
    "graph-pooled": ("csmf", [*GRAPH, "train.full_softmax_max_items=0", "train.pool_items=64"]),
    "graph-naive-ft": ("naive-ft", GRAPH),
    "graph-packnet": ("packnet", GRAPH),
    "graph-single": ("single-click", GRAPH),
    "mlp-csmf": ("csmf", MLP),
    "mlp-aml-weight": ("csmf", [*MLP, "cascade.aml_form=weight"]),
    "mlp-full-softmax": ("csmf", [*MLP, "train.full_softmax_max_items=100000", "train.aux_weight=0.2"]),
    "mlp-no-context": ("csmf-no-context", MLP),
    "mlp-naive-ft": ("naive-ft", MLP),
    "mlp-packnet": ("packnet", MLP),
    "mlp-single": ("single-conversion", MLP),
    "mlp-user-id": ("csmf", [*MLP, "model.user_id=true", "model.user_hidden=16"]),
    "mt-graph-mmoe": ("mmoe", GRAPH),
    "mt-graph-mvke": ("mvke", GRAPH),
    "mt-mlp-shared-bottom": ("shared-bottom", MLP),
    "mt-mlp-mmoe": ("mmoe", MLP),
    "mt-mlp-ple": ("ple", MLP),
    "mt-mlp-mvke": ("mvke", MLP),
    "stream": ("csmf", [*MLP, "train.stream=true", "model.history=false", "model.user_id=true"]),
}


def config_of(name: str, cache_dir: str = "") -> Config:
    overrides = CASES[name][1]
    if any(o == "train.stream=true" for o in overrides):
        overrides = [*overrides, f"data.cache_dir={cache_dir}"]
    return override(Config(), [*SIM, *overrides])


def digest(model) -> str:
    """sha256 over the final weights (names, shapes and bytes, in order)."""
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        t = value.detach().contiguous().cpu()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def fit(name: str, cache_dir: str) -> dict:
    """Train case `name` and return its record: test metrics (full precision) and the weights' digest."""
    kind, _ = CASES[name]
    cfg = config_of(name, cache_dir)
    data = load_dataset(cfg)
    if kind in ("shared-bottom", "mmoe", "ple", "mvke"):
        model = MultiTask(kind, cfg).fit(data)
    else:
        model = CSMF.variant(kind, cfg).fit(data)
    metrics = evaluate(model, data, cfg.eval.ks, cfg.eval.score_budget_mb, stages=model.served(data))
    return {"metrics": metrics, "weights": digest(model.model)}


def fit_all(names=None) -> dict[str, dict]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return {name: fit(name, str(Path(tmp) / name)) for name in names or CASES}
    finally:
        torch.set_num_threads(before)


def differences(got: dict, want: dict) -> list[str]:
    out = []
    for name in sorted(set(got) | set(want)):
        if name not in got or name not in want:
            out.append(f"{name}: only in {'the fit' if name in got else 'the record'}")
            continue
        g, w = got[name], want[name]
        for stage in sorted(set(g["metrics"]) | set(w["metrics"])):
            gm, wm = g["metrics"].get(stage, {}), w["metrics"].get(stage, {})
            moved = {k: (wm.get(k), gm.get(k)) for k in sorted(set(gm) | set(wm)) if gm.get(k) != wm.get(k)}
            if moved:
                out.append(f"{name} {stage}: " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in moved.items()))
        if g["weights"] != w["weights"]:
            out.append(f"{name}: weights differ")
    return out


def main(argv: list[str]) -> int:
    got = fit_all()
    if "--write" in argv:
        RECORD.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"wrote {RECORD} ({len(got)} cases)")
        return 0
    moved = differences(got, json.loads(RECORD.read_text()))
    print("\n".join(moved) or f"all {len(got)} golden fits identical")
    return 1 if moved else 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    sys.exit(main(sys.argv[1:]))
