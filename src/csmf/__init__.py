"""csmf: multi-objective embedding-based retrieval with Cascaded Selective Mask Fine-Tuning."""

from importlib import metadata

try:
    __version__ = metadata.version("csmf")
except metadata.PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
