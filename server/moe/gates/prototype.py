"""`PrototypeGate`: route each request to the nearest domain prototypes.

Each site sends once a DP-noised mean routing feature of its training prompts
(`fedmoe.client.prototype.PrototypeMessage`); the coordinator averages them per domain,
weighted by count, into one prototype per expert. A request's feature is compared with
every prototype by cosine similarity after subtracting the prototypes' mean (what all
domains share, the templates, cancels), and the similarities go through a softmax with
temperature; the served model keeps the top-k.
"""

from __future__ import annotations

import torch

from fedmoe.shared.errors import FedmoeError
from fedmoe.shared.features import FeatureConfig


class PrototypeGate:
    name = "prototype"
    needs_data = True
    site_requirements = "one DP-noised mean routing feature (prototype) of its training prompts per site, once"

    def __init__(self, served, prototypes: torch.Tensor, temperature: float = 0.05):
        if prototypes.shape[0] != len(served.experts):
            raise FedmoeError(f"prototype gate has {prototypes.shape[0]} prototypes for {len(served.experts)} experts")
        if prototypes.shape[1] != served.featurizer.cfg.dim:
            raise FedmoeError(f"prototypes have dimension {prototypes.shape[1]}, the feature config says {served.featurizer.cfg.dim}")
        if temperature <= 0:
            raise FedmoeError(f"prototype gate temperature must be > 0, got {temperature}")
        self.served, self.experts = served, list(served.experts)
        self.prototypes = prototypes.float().cpu()
        self.temperature = float(temperature)
        self.center = self.prototypes.mean(0)
        self._keys = torch.nn.functional.normalize(self.prototypes - self.center, dim=-1)

    @classmethod
    def from_messages(cls, served, messages, temperature: float = 0.05) -> "PrototypeGate":
        """`messages`: iterable of (domain, PrototypeMessage) from the sites."""
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for domain, msg in messages:
            if domain not in served.experts:
                raise FedmoeError(f"prototype from a site of domain {domain!r}, which has no expert")
            vec = msg.prototype.float().cpu()
            if vec.dim() != 1 or not torch.isfinite(vec).all():
                raise FedmoeError(f"prototype message for {domain!r} is not a finite vector")
            sums[domain] = sums.get(domain, 0) + vec * msg.count
            counts[domain] = counts.get(domain, 0) + msg.count
        missing = [e for e in served.experts if e not in sums]
        if missing:
            raise FedmoeError(f"no site sent a prototype for expert(s) {', '.join(missing)}")
        protos = torch.stack([sums[e] / counts[e] for e in served.experts])
        return cls(served, protos, temperature)

    @torch.no_grad()
    def route(self, prompts: list[str]) -> torch.Tensor:
        q = self.served.featurizer(prompts)
        sim = torch.nn.functional.normalize(q - self.center, dim=-1) @ self._keys.T
        return torch.softmax(sim / self.temperature, dim=-1)

    def state(self):
        return {"prototypes": self.prototypes}, {"temperature": self.temperature,
                                                 "features": self.served.featurizer.cfg.as_dict()}

    @classmethod
    def from_state(cls, served, tensors, meta):
        if FeatureConfig.from_dict(meta.get("features", {})) != served.featurizer.cfg:
            raise FedmoeError("prototype gate was built with other routing features than the served model uses")
        return cls(served, tensors["prototypes"], meta.get("temperature", 0.05))
