"""pfl: model-heterogeneous personalized federated learning (pFedLoRA and baselines) on Lightning."""

__version__ = "0.1.0"
