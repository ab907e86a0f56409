"""What a feature set reads from residual-stream vectors: one object for every consumer (scores, drift, judge).

A set has *units*: the SAE features of an SAE feature set, or the residual-space directions of a direction set.
`SetReadout` turns residuals `(tokens, d_in)` at the set's hook point into

- `unit_values`: each unit's value per token, `(tokens, m)`: a feature's SAE activation (non-negative), or a
  direction's projection minus its offset (positive on the target side of the contrast the set was built on);
- `token_scores`: the set's value per token, `unit_values @ weights` (the mean over units when the set has no
  weights; the sparse readout's weights when it has);
- `score`: the set's score of pooled unit values, `pooled @ weights + bias`;
- `projection`: the norm of the residual's projection onto the span of the units' directions (decoder
  directions or the directions themselves).

A direction costs one dot product per token; an SAE feature one encoder column (ReLU / JumpReLU) or the whole
encoding (TopK).
"""

from __future__ import annotations

import hashlib

import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.standard_sae import StandardSAE
from torch import nn

from geoguard.features import FeatureSet, sae_fingerprint
from geoguard.sae import check_sae_fits, sae_hook_name


def encode_features(sae: SAE, x: torch.Tensor, feature_ids: torch.Tensor) -> torch.Tensor:
    """SAE activations of only `feature_ids` for inputs `x` `(n, d_in)`, returned as `(n, len(feature_ids))`.

    For ReLU (`StandardSAE`) and JumpReLU SAEs a feature's activation depends on its own encoder column only,
    so just those columns are computed: exact, and about `d_sae / k` times cheaper. Other architectures (TopK,
    gated, ...) couple the features, so the full encoding is computed and sliced.
    """
    if not isinstance(sae, StandardSAE | JumpReLUSAE):
        return sae.encode(x)[:, feature_ids]
    sae_in = sae.process_sae_in(x)
    hidden_pre = sae_in @ sae.W_enc[:, feature_ids] + sae.b_enc[feature_ids]  # (n, k)
    acts = sae.activation_fn(hidden_pre)
    if isinstance(sae, JumpReLUSAE):
        acts = acts * (hidden_pre > sae.threshold[feature_ids]).to(acts.dtype)
    return acts


class SetReadout:
    """Read a feature set (SAE features or directions) from residuals at its hook point.

    Args:
        feature_set (`FeatureSet`): an SAE feature set or a direction set (`feature_set.is_directions`).
        sae (`sae_lens.SAE`, *optional*): the SAE of an SAE feature set (checked to be the set's); ignored by a
            direction set, which reads the residual stream itself.

    Example:
        ```python
        readout = SetReadout(FeatureSet.load(sae=sae), sae)
        values = readout.unit_values(residuals)  # (tokens, k)
        readout.token_scores(values)  # (tokens,)
        ```
    """

    def __init__(self, feature_set: FeatureSet, sae: SAE | None = None):
        self.feature_set = feature_set
        self.weights = feature_set.score_weights()  # (m,)
        self.bias = feature_set.bias if feature_set.weights is not None else 0.0
        if feature_set.is_directions:
            self.sae = None
            self.hook_name = feature_set.hook_name
            self._directions = feature_set.decoder.float()  # (m, d_in), unit
            self._offsets = torch.tensor(feature_set.offsets, dtype=torch.float32)  # (m,)
        else:
            if sae is None:
                raise ValueError(
                    f"Feature set {feature_set.name!r} holds SAE features: pass the SAE it was selected on."
                )
            feature_set.check_belongs_to(sae)
            self.sae = sae
            self.hook_name = sae_hook_name(sae)
            self.ids = torch.tensor(feature_set.feature_ids)
            with torch.no_grad():
                self._directions = nn.functional.normalize(sae.W_dec.detach()[self.ids].float(), dim=1)
        with torch.no_grad():
            self._basis = torch.linalg.qr(self._directions.T).Q  # (d_in, m) orthonormal basis of their span

    @property
    def nonnegative(self) -> bool:
        """Whether unit values are never negative (SAE activations are; direction projections are not)."""
        return self.sae is not None

    @property
    def device(self) -> torch.device:
        return self.sae.device if self.sae is not None else self._directions.device

    def check_fits(self, model: nn.Module) -> None:
        """Raise `ValueError` unless the set can read `model` (the SAE's d_in and hook; a direction set's model)."""
        if self.sae is not None:
            check_sae_fits(self.sae, model)
        else:
            self.feature_set.check_fits_model(model)

    def fingerprint(self) -> str:
        """Identifies what the readout computes (for caches of scores)."""
        parts = [self.hook_name, str(self.weights.tolist()), str(self.bias)]
        if self.sae is not None:
            parts += [sae_fingerprint(self.sae), str(self.ids.tolist())]
        else:
            directions = self._directions.detach().cpu().numpy().tobytes()
            parts += [hashlib.sha256(directions).hexdigest(), str(self._offsets.tolist())]
        return "|".join(parts)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.sae is not None:
            return x.detach().to(self.sae.device, self.sae.dtype)
        return x.detach().to(self._directions.device, torch.float32)

    @torch.no_grad()
    def unit_values(self, x: torch.Tensor) -> torch.Tensor:
        """`(tokens, m)` float32 value of each unit for residuals `x` `(tokens, d_in)`."""
        x = self._input(x)
        if self.sae is not None:
            return encode_features(self.sae, x, self.ids.to(x.device)).float()
        return x @ self._directions.T - self._offsets  # (tokens, m)

    @torch.no_grad()
    def along(self, x: torch.Tensor) -> torch.Tensor:
        """`(tokens, m)` projection of `x` along each unit's direction (in the SAE's input space for SAE sets)."""
        x = self._input(x)
        centred = self.sae.process_sae_in(x).float() if self.sae is not None else x
        return centred @ self._directions.T

    @torch.no_grad()
    def projection(self, x: torch.Tensor) -> torch.Tensor:
        """`(tokens,)` norm of the projection of `x` onto the span of the units' directions."""
        x = self._input(x)
        centred = self.sae.process_sae_in(x).float() if self.sae is not None else x
        return (centred @ self._basis).norm(dim=1)

    def token_scores(self, values: torch.Tensor) -> torch.Tensor:
        """`(...)` the set's value of unit values `(..., m)`: their weighted sum (the mean without weights)."""
        return values @ self.weights.to(values.device)

    def score(self, pooled: torch.Tensor) -> torch.Tensor:
        """`(n,)` the set's score of pooled unit values `(n, m)`; with a sparse readout, its logit."""
        return self.token_scores(pooled) + self.bias

    def contributions(self, pooled: torch.Tensor) -> torch.Tensor:
        """`(n, m)` each unit's share of the score (weight times pooled value)."""
        return pooled * self.weights.to(pooled.device)

    def to(self, device: torch.device | str) -> SetReadout:
        if self.sae is not None:
            self.sae.to(device)
        else:
            self._offsets = self._offsets.to(device)
        self._directions, self._basis = self._directions.to(device), self._basis.to(device)
        return self
