"""The `flower` engine: pfl's algorithms on Flower (simulation with Ray, or a SuperLink/SuperNode
deployment). Needs the `flower` extra: `pip install '.[flower]'`."""
