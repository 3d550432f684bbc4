"""Cascade data: the in-memory model, loaders (JD, generic logs), the simulator and the splits."""

from csmf.data.errors import DataError
from csmf.data.jd import load_jd
from csmf.data.logtable import load_log
from csmf.data.schema import CascadeData, CascadeLog, LoadReport, leak_violations
from csmf.data.split import split_jd, split_log

__all__ = [
    "CascadeData",
    "CascadeLog",
    "DataError",
    "LoadReport",
    "leak_violations",
    "load_jd",
    "load_log",
    "split_jd",
    "split_log",
]
