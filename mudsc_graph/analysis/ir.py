"""The graph IR: a ``networkx.DiGraph`` built from a traced ``torch.fx.GraphModule``.

One IR node per fx node, keyed by the fx node's name, in fx (topological) order; an edge
``u -> v`` when ``v`` reads the value of ``u`` (attribute ``pos``: where in ``v``'s arguments).
Node attributes, written by the stage named in brackets:

========== ==========================================================================
key        meaning
========== ==========================================================================
``fx``     the ``torch.fx.Node`` [build]
``op``     fx opcode: placeholder, get_attr, call_module, call_function, call_method, output [build]
``target`` module class (call_module), function, method name, or attribute path [build]
``path``   qualified module path of the module that ran the op (``layer1.0.conv1``), "" at top [build]
``shape``  output shape: tuple of ints, list of tuples for tuple outputs, ``None`` otherwise [trace]
``value``  :class:`~mudsc_graph.analysis.propagate.Value` (or list of them) with one layout per axis [propagate]
``handler`` name of the layer handler that ran, or ``"unsupported"`` [propagate]
========== ==========================================================================

Graph attributes: ``graph.graph["module"]`` is the GraphModule, ``graph.graph["order"]`` the
node names in execution order.

Example (Conv -> BN -> ReLU)::

    x ──> conv1 ──> bn1 ──> relu ──> output
          (call_module, target=nn.Conv2d, path="conv1", shape=(2, 8, 4, 4))
"""

from __future__ import annotations

from typing import Any, Iterator

import networkx as nx
import torch.fx as fx


def module_path(node: fx.Node) -> str:
    """The qualified path of the module that executed ``node`` ("" for the top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        last = list(stack.values())[-1]
        return str(last[0] if isinstance(last, tuple) else last)
    return ""


def build_graph(gm: fx.GraphModule) -> nx.DiGraph:
    """The IR of a traced GraphModule (see the module docstring for the attributes)."""
    g = nx.DiGraph(module=gm, order=[])
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        target: Any = node.target
        if node.op == "call_module":
            target = type(modules[node.target])
        g.add_node(
            node.name,
            fx=node,
            op=node.op,
            target=target,
            path=module_path(node),
            shape=node.meta.get("mudsc_shape"),
        )
        g.graph["order"].append(node.name)
        for pos, inp in enumerate(_input_nodes(node)):
            g.add_edge(inp.name, node.name, pos=pos)
    return g


def _input_nodes(node: fx.Node) -> Iterator[fx.Node]:
    seen: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: seen.append(n) or n)
    return iter(seen)


def nodes_in_order(g: nx.DiGraph) -> Iterator[tuple[str, dict]]:
    for name in g.graph["order"]:
        yield name, g.nodes[name]
