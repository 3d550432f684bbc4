"""Experiments: the benchmark, the paper suite and its report, query cost, tuning and the weight sweep.
Imports the core, never serving."""
