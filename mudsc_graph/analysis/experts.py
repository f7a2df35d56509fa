"""Mixtures of experts of transformers v5, traced so that each expert's hidden units merge on their own.

transformers (v5) writes the experts of every mixture-of-experts family as one module with 3-D
weights (``gate_up_proj`` of shape (experts, 2 * hidden, d), ``down_proj``), dispatched by
``@use_experts_implementation`` to a kernel that sorts the tokens by expert (``grouped_mm``) or
gathers one weight matrix per token (``batched_mm``). In such a graph no tensor axis says which
expert a row belongs to, so an expert's hidden units cannot be told from another's; and the rows an
expert sees differ between two models (their routers differ), so activations of two models' experts
would be compared on different tokens.

While mudsc traces a model, such a module instead computes **every expert on every token** and
weights the results by the router's choice (zero for experts not chosen): the same function (up to
float rounding), written as the per-expert contractions the einsum rule reads as blocks, one per
expert. Activation statistics then see each expert's units on every calibration token, the same
tokens in both models. The price is calibration compute: experts / top-k times the experts' cost
(an 8-expert, top-2 model: 4x) while mudsc traces and calibrates; the merged model is saved as it
was written and runs its own kernel.
"""

from __future__ import annotations

import contextlib
import sys
import types
from typing import Iterator

import torch

__all__ = ["dense_experts", "is_hf_experts"]


def is_hf_experts(module: torch.nn.Module) -> bool:
    """A module whose class transformers wrapped with ``use_experts_implementation``."""
    if "transformers" not in sys.modules:  # nothing to do for models that do not use transformers
        return False
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "_is_expert_parallel", "down_proj"))


def _per_expert(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool, first: bool) -> torch.Tensor:
    """Every expert's linear map on every token: ``x`` (tokens, d) the first time, (tokens, experts, d) after."""
    lhs = "td" if first else "ted"
    out = torch.einsum(f"{lhs},edo->teo" if transposed else f"{lhs},eod->teo", x, w)
    return out if b is None else out + b


def _dense_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """``use_experts_implementation``'s contract (tokens, d), (tokens, k), (tokens, k) -> (tokens, d),
    with every expert computed on every token."""
    up = self.gate_up_proj if self.has_gate else self.up_proj
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    h = _per_expert(hidden_states.to(up.dtype), up, up_bias, self.is_transposed, first=True)
    h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
    out = _per_expert(h, self.down_proj, self.down_proj_bias if self.has_bias else None, self.is_transposed, first=False)
    if self.has_post_expert_norm:
        out = self.post_expert_norm(out)
    n_experts = out.shape[1]
    routing = torch.zeros(hidden_states.shape[0], n_experts, dtype=out.dtype, device=out.device)
    routing = routing.scatter(1, top_k_index.long(), top_k_weights.to(out.dtype))  # (tokens, experts), 0 where not chosen
    return torch.einsum("ted,te->td", out, routing).to(hidden_states.dtype)


@contextlib.contextmanager
def dense_experts(model: torch.nn.Module) -> Iterator[int]:
    """While inside, transformers' expert modules of ``model`` compute every expert on every token;
    yields how many modules were switched. Their own forward is restored on exit."""
    switched = [m for m in model.modules() if is_hf_experts(m) and "forward" not in vars(m)]
    try:
        for m in switched:
            m.forward = types.MethodType(_dense_forward, m)
        yield len(switched)
    finally:
        for m in switched:
            vars(m).pop("forward", None)
