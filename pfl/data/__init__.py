"""Data sets, partitioners, and in-memory batching."""

from pfl.data.batches import BatchTransform, TensorBatches
from pfl.data.datasets import Dataset, load_dataset, make_synthetic
from pfl.data.partition import ClientData, build_clients, partition_indices

__all__ = ["BatchTransform", "ClientData", "Dataset", "TensorBatches", "build_clients", "load_dataset",
           "make_synthetic", "partition_indices"]
