"""Rules for recurrent layers: ``nn.LSTM`` and ``nn.GRU`` (fx leaves) and their ATen twins
``aten.lstm.input`` / ``aten.gru.input`` (torch.export graphs).

For layer ``l`` and direction ``d`` (``_reverse`` for ``d = 1``) the ``H`` hidden units are one
space ``h[l][d]``:

- the rows of ``weight_ih``, ``weight_hh``, ``bias_ih`` and ``bias_hh`` are ``sum(h, h, h, h)``
  (LSTM gates i, f, g, o) or ``sum(h, h, h)`` (GRU gates r, z, n): every gate block permutes alike;
- the columns of ``weight_hh`` read ``h`` (the recurrence);
- the columns of ``weight_ih`` read the layer's input: the input's last axis for layer 0, the
  previous layer's output ``sum(h[l-1][0], h[l-1][1])`` (one part when unidirectional) above it.

The output sequence's last axis is the last layer's output space; its batch axis passes through
and its time axis is fixed (the recurrence reads the steps in order). ``h_n`` / ``c_n`` stack
layers and directions on axis 0 (index ``l * D + d``), so their last axis is a ``Dep`` on axis 0
with one part per layer-direction: a model that returns them fixes every hidden space through the
output rule, one that ignores them keeps the spaces free, and ``h_n[-1]`` is the last layer's
(last direction's) space. Initial states ``h0`` / ``c0`` are linked the same way, unless they are
uniform constants (``zeros``: what ``nn.LSTM`` builds, and torch.export records, for ``hx=None``).

Only the last layer's units show in the graph: every layer's output is also an internal probe,
``key = "layer{l}"``, computed by :func:`rnn_features` with the first ``l + 1`` layers' weights.
LSTM projections (``proj_size > 0``), packed sequences and anything else unexpected fall back to
``ctx.unsupported``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..propagate import OpContext, Value, op_name
from ..spaces import Dep, Layout
from .base import _plain, param_value

GATES = {"LSTM": 4, "GRU": 3}
_ATEN_ARGS = ("input", "hx", "params", "has_biases", "num_layers", "dropout", "train", "bidirectional", "batch_first")
# producers of uniform constant tensors: permuting any axis of them changes nothing
_UNIFORM = {"zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "new_full"}


@dataclass
class _Rnn:
    mode: str  # "LSTM" or "GRU"
    x: Value
    states: list[tuple[Any, Value | None]]  # (raw argument, value) of h0 (and c0)
    params: list[Value]  # per layer, per direction: w_ih, w_hh[, b_ih, b_hh]
    num_layers: int
    bidirectional: bool
    batch_first: bool
    has_biases: bool


def nn_rnn(ctx: OpContext) -> None:
    """``nn.LSTM`` / ``nn.GRU`` as a leaf module: output ``(out, (h_n, c_n))`` / ``(out, h_n)``."""
    m = ctx.module
    mode = getattr(m, "mode", None)
    if mode not in GATES:
        ctx.unsupported(f"recurrent mode {mode!r}")
        return
    if getattr(m, "proj_size", 0):
        ctx.unsupported("LSTM with proj_size > 0 (projected hidden state)")
        return
    x = ctx.input(0, "input")
    if not isinstance(x, Value) or x.ndim not in (2, 3):
        ctx.unsupported("input that is not a 2-d or 3-d tensor (a PackedSequence?)")
        return
    hx_arg = ctx.arg(1, "hx")
    if mode == "LSTM":
        if hx_arg is None:
            states: list[tuple[Any, Value | None]] = []
        elif isinstance(hx_arg, (tuple, list)) and len(hx_arg) == 2:
            states = [(a, ctx.value(a)) for a in hx_arg]
        else:
            ctx.unsupported("LSTM initial state that is not a (h0, c0) pair")
            return
    else:
        states = [] if hx_arg is None else [(hx_arg, ctx.value(hx_arg))]
    params = [param_value(ctx, n) for n in m._flat_weights_names]
    r = _Rnn(mode, x, states, params, m.num_layers, m.bidirectional, m.batch_first, m.bias)
    layouts = _rnn(ctx, r)
    if layouts is None:
        return
    out, hn = layouts
    ctx.set_output([out, [hn, list(hn)]] if mode == "LSTM" else [out, hn])


def aten_rnn(ctx: OpContext) -> None:
    """``aten.lstm.input`` / ``aten.gru.input``: output ``(out, h_n, c_n)`` / ``(out, h_n)``."""
    name = op_name(ctx.node.target)
    mode = {"lstm": "LSTM", "gru": "GRU"}.get(name)
    if mode is None:
        ctx.unsupported(f"recurrent op {name}")
        return
    a = {n: ctx.arg(i, n) for i, n in enumerate(_ATEN_ARGS)}
    x = ctx.value(a["input"])
    if not isinstance(x, Value) or x.ndim != 3:
        ctx.unsupported("input that is not a 3-d tensor")
        return
    flags = (a["has_biases"], a["bidirectional"], a["batch_first"])
    if not all(isinstance(f, bool) for f in flags) or not isinstance(a["num_layers"], int):
        ctx.unsupported("computed flags or layer count")
        return
    hx = a["hx"]
    raw = list(hx) if isinstance(hx, (list, tuple)) else [hx]
    if len(raw) != (2 if mode == "LSTM" else 1):
        ctx.unsupported("unexpected initial states")
        return
    params_arg = a["params"]
    params = [ctx.value(p) for p in params_arg] if isinstance(params_arg, (list, tuple)) else None
    if params is None:
        ctx.unsupported("parameters that are not a list")
        return
    r = _Rnn(mode, x, [(s, ctx.value(s)) for s in raw], params, a["num_layers"], a["bidirectional"], a["batch_first"], a["has_biases"])
    layouts = _rnn(ctx, r)
    if layouts is None:
        return
    out, hn = layouts
    ctx.set_output([out, hn, list(hn)] if mode == "LSTM" else [out, hn])


def _rnn(ctx: OpContext, r: _Rnn) -> tuple[list[Layout], list[Layout]] | None:
    """The shared rule; returns the layouts of the output sequence and of ``h_n`` (``c_n`` alike)."""
    G = GATES[r.mode]
    D = 2 if r.bidirectional else 1
    L = r.num_layers
    k = 4 if r.has_biases else 2
    x = r.x
    H = _checked_hidden_size(ctx, r, G, D, k)  # everything is checked before anything is linked,
    if H is None:  # so a fallback leaves no half-made links
        return None
    unbatched = x.ndim == 2
    t_ax = 0 if unbatched or not r.batch_first else 1
    b_ax = None if unbatched else 1 - t_ax
    state_shape = (L * D, H) if unbatched else (L * D, x.shape[b_ax], H)
    states = [(a, v) for a, v in r.states if a is not None]
    if any(not isinstance(v, Value) or v.shape != state_shape for _, v in states):
        ctx.unsupported(f"initial states that are not tensors of shape {state_shape}")
        return None

    sp = ctx.spaces
    time = _plain(ctx, x.axis(t_ax))
    ctx.fix_units(time, "the recurrence reads the time steps in order")
    batch = None if b_ax is None else _plain(ctx, x.axis(b_ax))

    hidden: list[int] = []  # index l * D + d, the order of h_n's axis 0
    layer_in: Layout = x.axis(-1)
    for l in range(L):
        hs = []
        for d in range(D):
            w_ih, w_hh, *bs = r.params[(l * D + d) * k : (l * D + d + 1) * k]
            h = ctx.new(H)
            rows = sp.sum_of((h,) * G)
            for p in (w_ih, w_hh, *bs):
                ctx.link(p.axis(0), rows)
            ctx.contract(layer_in, w_ih.axis(1))
            ctx.contract(h, w_hh.axis(1))
            hs.append(h)
        hidden += hs
        layer_in = sp.sum_of(hs)  # the layer's output: cat of both directions
        ctx.internal_probe(layer_in, f"layer{l}")

    per_state: Layout = hidden[0] if len(hidden) == 1 else Dep(0, tuple(hidden))
    for a, v in states:
        if _is_uniform(a):
            continue  # zeros (hx=None): the same under every permutation
        ctx.fix_units(v.axis(0), "layers and directions of an initial state")
        if batch is not None:
            ctx.link(v.axis(1), batch)
        ctx.link(v.axis(-1), per_state)

    out: list[Layout] = [time, layer_in] if unbatched else [time, batch, layer_in] if t_ax == 0 else [batch, time, layer_in]
    hn: list[Layout] = [ctx.new_fixed(L * D)] + ([] if batch is None else [batch]) + [per_state]
    return out, hn


def _checked_hidden_size(ctx: OpContext, r: _Rnn, G: int, D: int, k: int) -> int | None:
    """The hidden size when every weight has the shape the rule expects; else the op's fallback, None."""
    L, x = r.num_layers, r.x
    if L < 1 or len(r.params) != L * D * k or not all(isinstance(p, Value) for p in r.params):
        ctx.unsupported(f"expected {L * D * k} weight tensors (projections are not supported)")
        return None
    w_hh0 = r.params[1]
    if w_hh0.ndim != 2 or w_hh0.shape[0] % G:
        ctx.unsupported("unexpected weight_hh shape")
        return None
    H = w_hh0.shape[0] // G
    for l in range(L):
        for d in range(D):
            w_ih, w_hh, *bs = r.params[(l * D + d) * k : (l * D + d + 1) * k]
            cols = x.shape[-1] if l == 0 else D * H
            if w_ih.shape != (G * H, cols) or w_hh.shape != (G * H, H) or any(b.shape != (G * H,) for b in bs):
                ctx.unsupported("unexpected weight shapes (LSTM projections are not supported)")
                return None
    return H


def _is_uniform(a: Any) -> bool:
    """Whether an fx argument is a tensor filled with one value (``torch.zeros``, ``aten.zeros``, ...)."""
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method":
        return a.target in _UNIFORM
    return a.op == "call_function" and op_name(a.target) in _UNIFORM


def rnn_features(module: Any, args: tuple, kwargs: dict, key: str) -> torch.Tensor:
    """The output of layer ``l`` (``key = "layer{l}"``): the first ``l + 1`` layers run with the
    op's own weights and initial states, units (both directions, concatenated) on the last axis.

    ``module`` is the ``nn.LSTM`` / ``nn.GRU`` (fx graphs), or ``None`` with the arguments of
    ``aten.lstm.input`` / ``aten.gru.input`` (torch.export graphs).
    """
    n_layers = int(key.removeprefix("layer")) + 1
    if module is not None:
        x = args[0] if args else kwargs["input"]
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        lstm = module.mode == "LSTM"
        params = [getattr(module, n) for n in module._flat_weights_names]
        has_biases, dropout, train = module.bias, float(module.dropout), module.training
        bidirectional, batch_first, H = module.bidirectional, module.batch_first, module.hidden_size
    else:
        a = dict(zip(_ATEN_ARGS, args))
        a.update({n: kwargs[n] for n in _ATEN_ARGS if n in kwargs})
        x, hx, params = a["input"], a["hx"], list(a["params"])
        lstm = isinstance(hx, (list, tuple))  # lstm.input takes Tensor[] hx, gru.input one Tensor
        has_biases, dropout, train = a["has_biases"], a["dropout"], a["train"]
        bidirectional, batch_first, H = a["bidirectional"], a["batch_first"], params[1].shape[1]
    D = 2 if bidirectional else 1
    n = n_layers * D
    k = 4 if has_biases else 2
    unbatched = x.dim() == 2
    if unbatched:  # as nn.LSTM does: a batch of one
        x = x.unsqueeze(0 if batch_first else 1)
    b = x.shape[0 if batch_first else 1]
    if hx is None:
        zeros = x.new_zeros(n, b, H)
        hx = [zeros, zeros] if lstm else zeros
    if lstm:
        hx = [s.unsqueeze(1) if unbatched else s for s in hx]
        out = torch.lstm(x, [s[:n] for s in hx], params[: n * k], has_biases, n_layers, dropout, train, bidirectional, batch_first)[0]
    else:
        hx = hx.unsqueeze(1) if unbatched else hx
        out = torch.gru(x, hx[:n], params[: n * k], has_biases, n_layers, dropout, train, bidirectional, batch_first)[0]
    return out.squeeze(0 if batch_first else 1) if unbatched else out
