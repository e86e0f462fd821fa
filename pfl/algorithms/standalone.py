"""Standalone: every client trains its private model on its own data alone. Nothing travels.

The floor every federated method must beat: whatever it gains over this comes from collaboration.
"""

from __future__ import annotations

from pfl.algorithms.base import Algorithm, LocalClient, Tensors, Upload, register


class StandaloneClient(LocalClient):
    def upload(self) -> Tensors:
        return {}


@register
class Standalone(Algorithm):
    name = "standalone"
    AGGREGATED = "nothing: standalone has no server step, the aggregation keys have no effect"

    def make_client(self, arch: str) -> StandaloneClient:
        return StandaloneClient(self.private_model(arch), self.cfg, self.spec.transform, self.spec.num_classes)

    def aggregate(self, global_state: Tensors, uploads: list[Upload]) -> Tensors:
        return {}

    def upload_template(self, global_state: Tensors) -> Tensors:
        return {}
