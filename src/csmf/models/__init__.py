"""Models behind the common Retriever interface."""

from csmf.models.als import ALS, ALSSettings
from csmf.models.itemknn import ItemKNN, ItemKNNSettings
from csmf.models.popularity import Popularity
from csmf.retriever import Retriever

__all__ = ["ALS", "ALSSettings", "ItemKNN", "ItemKNNSettings", "Popularity", "Retriever"]
