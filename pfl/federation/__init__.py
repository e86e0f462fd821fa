"""Round loop, client sampling, client-state store, cost accounting."""

from pfl.federation.engine import CallbackList, Callbacks, ClientRunner, FederatedRun, make_runner, sample_clients
from pfl.federation.store import DiskStore, MemoryStore

__all__ = ["CallbackList", "Callbacks", "ClientRunner", "DiskStore", "FederatedRun", "MemoryStore", "make_runner",
           "sample_clients"]
