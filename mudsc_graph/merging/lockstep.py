"""N models' probe extractors run in step, probe by probe, so a group is folded as soon as it can be.

Statistics need every model's features of a group at once. Running each model to its end first
holds every probe value of every model (two ViT-B/16 on 16 images: about 1.6 GB). A
:class:`Stepper` runs one model's probe extractor a segment of nodes at a time and frees each value
after its last use, so stepping the N models together, up to where a group's last probe is
computed in all of them, holds only their live activations and the probe values not folded yet:

    >>> steppers = [Stepper(ext, state) for ext, state in runs]
    >>> for s in steppers:
    ...     s.start(inputs)
    >>> for s in steppers:
    ...     s.advance(s.ready(["blocks_0_mlp_act"]))     # run each model up to that probe
    >>> values = [s.values["blocks_0_mlp_act"] for s in steppers]

The values are the ones a whole run of the extractor returns: the same nodes run in the same order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx as fx

from ..inputs import bind, placeholders


class _Holder(torch.nn.Module):
    """Owns ``ext`` so that :func:`torch.func.functional_call` can swap a model's state into it
    around any function (the state's names prefixed with ``ext.``)."""

    def __init__(self, ext: fx.GraphModule) -> None:
        super().__init__()
        self.ext = ext

    def forward(self, fn: Any) -> Any:
        return fn()


class Stepper:
    """One model's probe extractor (``ext``, with the state dict ``state`` swapped in when given),
    run node by node: :meth:`start` on a batch, :meth:`advance` to a node, probe values in ``values``."""

    def __init__(self, ext: fx.GraphModule, state: Mapping[str, torch.Tensor] | None = None) -> None:
        self.ext = ext
        self.interp = fx.Interpreter(ext)
        self.nodes = [n for n in ext.graph.nodes if n.op not in ("placeholder", "output")]
        output = next(n for n in ext.graph.nodes if n.op == "output")
        self.outputs: dict[str, fx.Node] = dict(output.args[0])
        index = {n: k for k, n in enumerate(self.nodes)}
        self.position = {key: index.get(node, -1) for key, node in self.outputs.items()}  # -1: a placeholder
        self.keys_of: dict[fx.Node, list[str]] = {}
        for key, node in self.outputs.items():
            self.keys_of.setdefault(node, []).append(key)
        # when each value is dropped: after the last node that reads it (not the Interpreter's
        # user_to_last_uses, where a probe's last use is the output: here its value lives on in ``values``)
        last = {n: k for k, n in enumerate(self.nodes)}  # a value no node reads is dropped at once
        last.update((p, -1) for p in placeholders(ext))
        for k, n in enumerate(self.nodes):
            last.update((a, k) for a in n.all_input_nodes)
        self.drop: list[list[fx.Node]] = [[] for _ in self.nodes]
        for node, k in last.items():
            if k >= 0:
                self.drop[k].append(node)
        self.holder = _Holder(ext) if state is not None else None
        self.state = {f"ext.{k}": v for k, v in state.items()} if state is not None else None
        self.at, self.values = 0, {}

    def ready(self, keys: Iterable[str]) -> int:
        """The node after which every probe of ``keys`` is computed."""
        return max(self.position[k] for k in keys)

    def start(self, inputs: Any) -> None:
        """Begin a batch: bind ``inputs`` to the placeholders; nothing runs yet."""
        phs = placeholders(self.ext)
        self.interp.env = dict(zip(phs, bind(self.ext, inputs)))
        self.values = {k: self.interp.env[n] for n in phs for k in self.keys_of.get(n, ())}
        self.at = 0

    def advance(self, upto: int) -> None:
        """Run the nodes up to and including position ``upto`` (nothing when already past it)."""
        if upto < self.at:
            return
        if self.holder is None:
            self._run(upto)
        else:
            torch.func.functional_call(self.holder, self.state, (lambda: self._run(upto),))

    def _run(self, upto: int) -> None:
        env = self.interp.env
        for k in range(self.at, upto + 1):
            node = self.nodes[k]
            env[node] = self.interp.run_node(node)
            for key in self.keys_of.get(node, ()):
                self.values[key] = env[node]
            for dead in self.drop[k]:
                env.pop(dead, None)
        self.at = upto + 1

    def finish(self) -> None:
        """End the batch: free whatever is still held."""
        self.interp.env, self.values = {}, {}
