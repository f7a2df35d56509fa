"""CCA merging (Horoi et al., ICML 2024, "Harmony in Diversity: Merging Neural Networks with
Canonical Correlation Analysis") as a mudsc plugin: a soft matcher whose merge / unmerge maps are
dense linear maps, not assignments.

For one group of ``N`` models with ``O`` units each, model 0 is the reference. For every model
``i >= 1``, from the (regularised) within-model covariances ``C00``, ``Cii`` and the cross
covariance ``C0i`` of the units' activations::

    C~ = C + gamma * mean(diag(C)) * I                       (C00 and Cii; gamma: the option)
    K  = C00~^(-1/2) C0i Cii~^(-1/2) = U S V^T               (whitened cross-covariance, its SVD)
    P0 = C00~^(-1/2) U,   Pi = Cii~^(-1/2) V                  (canonical directions; S: canonical correlations)
    T_i = (P0^T)^(-1) Pi^T = C00~^(1/2) U V^T Cii~^(-1/2)     (model i's units -> model 0's: T_i x_i ~ x_0)
    T_i^(-1) = (Pi^T)^(-1) P0^T = Cii~^(1/2) V U^T C00~^(-1/2)

``P0^T x_0`` and ``Pi^T x_i`` are the canonical variates (unit variance, correlation ``S``);
``T_i`` maps model i's features to its variates and those back into model 0's units. The merged
units are the average of the models' features in model 0's space, ``z = (x_0 + sum_i T_i x_i) / N``:
merge block 0 is ``I / N`` and block ``i`` is ``T_i / N``; model i's features are recovered from
``z`` by the inverse map, so unmerge block 0 is ``I`` and block ``i`` is ``T_i^(-1)``. The score is
the mean canonical correlation (mean of ``S`` over units and models).

``T_i`` depends on ``U V^T`` only (the orthogonal polar factor of ``K``), not on the ordering or
the multiplicity of the canonical correlations: for a copy of model 0 with its units permuted,
``x_i = P x_0``, it is exactly ``P^T`` (up to float error) and the merge is model 0 itself.

The covariance the matcher decomposes is the similarity it receives in the scale of the
activations, ``S * outer(sd, sd)`` with ``sd`` the units' standard deviations (from the
``covariances`` the solver passes, :class:`~mudsc_graph.MatchingStrategy` ``needs_covariances``):
with the ``cca`` method (``alpha = 0``) that is the activation covariance itself; with
``merge(method="mudsc", mode="cca", alpha=a)`` it mixes in the weight similarity; a group without
activation statistics is decomposed as a correlation (``sd = 1``).

Limits: no block matching (attention heads and GroupNorm groups are averaged in place, with a
warning); the merged weights are products with dense ``O x O`` maps (``O^2`` memory per map).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mudsc_graph import MatcherParameter, MatchingStrategy, MergeMethod, hookimpl
from mudsc_graph.merging.matching import Matching, validate_sims

__all__ = ["DEFAULT_GAMMA", "cca_strategy", "cca_transform", "canonical_directions", "match_cca"]

DEFAULT_GAMMA = 0.3
"""Ridge on the within-model covariances, relative to their mean variance (see the README)."""


def regularised(c: torch.Tensor, gamma: float) -> torch.Tensor:
    """``C + gamma * mean(diag(C)) * I`` in float64, symmetrised (a group of dead units: ``+ gamma * I``)."""
    c = c.double()
    c = (c + c.T) / 2
    scale = float(c.diagonal().mean())
    if not scale > 0.0:
        scale = 1.0
    return c + (gamma * scale) * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)


def _half_powers(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C^(1/2), C^(-1/2))`` of a symmetric positive (semi)definite float64 ``C``; eigenvalues
    are clamped at ``1e-12`` times the largest, so a singular ``C`` (gamma = 0) stays finite."""
    w, v = torch.linalg.eigh(c)
    top = float(w.max()) if w.numel() else 1.0
    w = w.clamp(min=max(top, 1e-300) * 1e-12)
    r = w.sqrt()
    return (v * r) @ v.T, (v / r) @ v.T


def canonical_directions(c00: torch.Tensor, cii: torch.Tensor, c0i: torch.Tensor, gamma: float = DEFAULT_GAMMA
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P0, Pi, S)``: the canonical directions of the two models (columns) and the canonical
    correlations, from the covariances (``c0i`` is ``Cov(x_0, x_i)``, ``O x O``); float64."""
    h0, ih0 = _half_powers(regularised(c00, gamma))
    hi, ihi = _half_powers(regularised(cii, gamma))
    u, s, vh = torch.linalg.svd(ih0 @ c0i.double() @ ihi)
    return ih0 @ u, ihi @ vh.T, s


def cca_transform(c00: torch.Tensor, cii: torch.Tensor, c0i: torch.Tensor, gamma: float = DEFAULT_GAMMA
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(T, T^-1, S)`` in float64: ``T = (P0^T)^-1 Pi^T`` maps model i's units into model 0's
    (``T @ x_i ~ x_0``), computed as ``C00~^(1/2) U V^T Cii~^(-1/2)`` without inverting anything
    (see the module docstring); ``S`` are the canonical correlations."""
    h0, ih0 = _half_powers(regularised(c00, gamma))
    hi, ihi = _half_powers(regularised(cii, gamma))
    u, s, vh = torch.linalg.svd(ih0 @ c0i.double() @ ihi)
    q = u @ vh
    return h0 @ q @ ihi, hi @ q.T @ ih0, s


DEAD = 1e-6
"""A unit whose standard deviation is at most this times the group's largest is dead (constant)."""


def _scaled(sim: torch.Tensor, cov: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """The similarity in the activations' scale: ``S * outer(sd, sd)`` (``sd = 1`` without ``cov``).

    A dead unit (constant on the data) has no covariance at all, so CCA could not tell which dead
    unit of model i is which of model 0 (nor its sign): its ``sd`` is floored at
    ``sqrt(max(gamma, 1e-4) * mean variance)``, so that the similarity's "equal constants are alike"
    (:meth:`~mudsc_graph.merging.statistics.CorrelationAccumulator.correlation`) pairs them. Live
    units keep their own scale.
    """
    s = sim.double()
    if cov is None:
        return s
    sd = cov.diagonal().double().clamp(min=0).sqrt().to(s.device)
    top = float(sd.max()) if sd.numel() else 0.0
    dead = sd <= DEAD * top
    if bool(dead.any()):
        live = sd[~dead]
        var = float((live**2).mean()) if live.numel() else 1.0
        sd = torch.where(dead, torch.full_like(sd, (max(gamma, 1e-4) * var) ** 0.5), sd)
    return s * torch.outer(sd, sd)


def match_cca(sims: Sequence[torch.Tensor], n_models: int, blocks: int = 1, *,
              covariances: Sequence[torch.Tensor | None] | None = None, gamma: float = DEFAULT_GAMMA,
              **options: Any) -> list[Matching]:
    """The ``cca`` strategy: every model mapped into model 0's units by CCA, then averaged (see
    the module docstring). ``covariances``: one ``(N*O) x (N*O)`` activation covariance (or
    ``None``) per similarity, as the solver passes them; ``gamma``: the relative ridge."""
    if options:
        raise ValueError(f"matching strategy 'cca' got unknown options {', '.join(sorted(options))} (accepted: gamma)")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0.0 or gamma == float("inf"):
        raise ValueError(f"cca option gamma must be a finite number >= 0, got {gamma!r}")
    units = validate_sims(sims, n_models, blocks)
    if blocks > 1:
        raise ValueError("matching strategy 'cca' cannot match blocks (it registers supports_blocks=False)")
    if covariances is not None and len(covariances) != len(sims):
        raise ValueError(f"cca got {len(covariances)} covariances for {len(sims)} similarities")
    out = []
    for k, (sim, o) in enumerate(zip(sims, units)):
        cov = None if covariances is None else covariances[k]
        if cov is not None and tuple(cov.shape) != tuple(sim.shape):
            raise ValueError(f"covariance {k} has shape {tuple(cov.shape)}, its similarity {tuple(sim.shape)}")
        c = _scaled(sim, cov, gamma)
        eye = torch.eye(o, dtype=torch.float64, device=c.device)
        merge = torch.zeros(o, n_models * o, dtype=torch.float64, device=c.device)
        unmerge = torch.zeros(n_models * o, o, dtype=torch.float64, device=c.device)
        merge[:, :o] = eye / n_models
        unmerge[:o] = eye
        scores = []
        for i in range(1, n_models):
            blk = slice(i * o, (i + 1) * o)
            t, t_inv, s = cca_transform(c[:o, :o], c[blk, blk], c[:o, blk], gamma)
            merge[:, blk] = t / n_models
            unmerge[blk] = t_inv
            scores.append(float(s.mean()))
        score = sum(scores) / len(scores) if scores else 0.0
        out.append(Matching(merge.float().to(sim.device), unmerge.float().to(sim.device), score, int(n_models)))
    return out


def cca_strategy(name: str = "cca", gamma: float = DEFAULT_GAMMA) -> MatchingStrategy:
    """The CCA matching strategy under ``name``; its ridge is the parameter ``gamma`` (default
    ``gamma``): ``merge(..., matcher_options={"gamma": 0.1})``, ``mudsc merge --matcher-opt gamma=0.1``."""
    return MatchingStrategy(
        name, match_cca, supports_blocks=False, needs_covariances=True,
        description="CCA merging (Horoi et al. 2024): each model mapped into model 0's units by canonical correlation "
                    "analysis, then averaged; dense maps; no block matching (from mudsc-cca-plugin)",
        parameters=(MatcherParameter("gamma", float(gamma), "the ridge added to each covariance, relative to its mean variance",
                                     minimum=0.0),),
    )


@hookimpl
def mudsc_matching_strategies() -> list[MatchingStrategy]:
    return [cca_strategy()]


@hookimpl
def mudsc_merge_methods() -> list[MergeMethod]:
    return [MergeMethod("cca", matcher="cca", alpha=0.0, activations="always",
                        description="CCA merging from activation covariances alone (from mudsc-cca-plugin)")]
