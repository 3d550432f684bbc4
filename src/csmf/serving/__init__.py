"""Serving: the artifact format and export, the vector index, the recommender, the HTTP app, load and
query benchmarks. Imports the core, never the experiments."""
