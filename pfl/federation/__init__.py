"""Round loop and engines (engine), the client side (client), client-state store, cost accounting."""

from pfl.federation.client import ClientRunner, ClientWorker, make_runner
from pfl.federation.engine import CallbackList, Callbacks, FederatedRun, sample_clients
from pfl.federation.store import DiskStore, MemoryStore

__all__ = ["CallbackList", "Callbacks", "ClientRunner", "ClientWorker", "DiskStore", "FederatedRun", "MemoryStore",
           "make_runner", "sample_clients"]
