"""Backbones: the encoders the cascade trains, each behind the Backbone seam (csmf.backbones.base).

`model.encoder` names one of BACKBONES; `build_backbone` is the one place a name becomes a class. A new encoder
is a Backbone subclass (its abstract methods and `build` classmethod), added here and to the choices of
config.ModelConfig.encoder.
"""

from __future__ import annotations

from csmf.backbones.base import Backbone
from csmf.backbones.graph import GraphBackbone
from csmf.backbones.mlp import MLPBackbone

BACKBONES: dict[str, type[Backbone]] = {"graph": GraphBackbone, "mlp": MLPBackbone}


def build_backbone(data, cfg, seed: int, objectives: tuple[str, ...] | None = None,
                   context_sizes: dict[str, int] | None = None) -> Backbone:  # fmt: skip
    """The backbone `cfg.model.encoder` names over `data` (a CascadeData), for `objectives` (default: every
    stage). context_sizes: the per-row context tables' sizes (default: data's; a saved model passes its own)."""
    encoder = cfg.model.encoder
    if encoder not in BACKBONES:
        raise ValueError(f"model.encoder must be one of {sorted(BACKBONES)}, got {encoder!r}")
    sizes = data.context_sizes() if context_sizes is None else context_sizes
    return BACKBONES[encoder].build(data, cfg, seed, tuple(objectives or data.stages), sizes)


__all__ = ["BACKBONES", "Backbone", "GraphBackbone", "MLPBackbone", "build_backbone"]
