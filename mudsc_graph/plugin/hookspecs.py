"""Every hook a mudsc plugin can implement.

A plugin is a module or object with functions decorated by :data:`hookimpl`, registered through
the ``mudsc`` entry-point group of an installed package::

    # pyproject.toml of a plugin package
    [project.entry-points.mudsc]
    my_plugin = "my_package.mudsc_plugin"

Registration hooks take no arguments and return an iterable of small frozen records from
:mod:`mudsc_graph.plugin.records`. The built-in handlers and architectures register through these very
hooks (see ``mudsc_plugins``), so a third-party plugin can do everything a built-in can.
"""

from __future__ import annotations

from typing import Iterable

import pluggy

from .records import Architecture, Dataset, LayerHandler, MatchingStrategy, MergeMethod

PROJECT = "mudsc"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mudsc_layer_handlers() -> Iterable[LayerHandler]:
    """Register how the axes of an op relate, so merge groups can flow through it.

    Called once when the registry is built. Return :class:`~mudsc_graph.plugin.records.LayerHandler`
    records; a module class named by a ``call_module`` handler is traced as a leaf. Example::

        from mudsc_graph import hookimpl, LayerHandler

        def _scaled_linear(ctx):
            x = ctx.input(0)
            ctx.contract(x.axis(-1), ctx.param("weight", 1))  # the weight reads the input units
            ctx.link(ctx.param("scale", 0), ctx.param("weight", 0))
            out = ctx.like(x)                                    # batch axes pass through
            out[-1] = ctx.param("weight", 0)                     # output features = weight rows
            ctx.set_output(out)

        @hookimpl
        def mudsc_layer_handlers():
            return [LayerHandler("my.ScaledLinear", "call_module", (ScaledLinear,), _scaled_linear)]
    """


@hookspec
def mudsc_architectures() -> Iterable[Architecture]:
    """Register model families that commands accept by name (``mudsc inspect --arch NAME``).

    Called once when the registry is built. Return :class:`~mudsc_graph.plugin.records.Architecture`
    records. Example::

        @hookimpl
        def mudsc_architectures():
            return [Architecture("tiny_mlp", factory=TinyMLP, example_inputs=lambda b: (torch.randn(b, 8),))]
    """


@hookspec
def mudsc_matching_strategies() -> Iterable[MatchingStrategy]:
    """Register matchers that turn unit similarities into merge / unmerge matrices.

    Called once when the registry is built. Return
    :class:`~mudsc_graph.plugin.records.MatchingStrategy` records; the built-ins are ``identity``,
    ``align`` and ``zip``. Example (a matcher that keeps model 0's order and averages)::

        from mudsc_graph.merging.matching import identity_matching

        @hookimpl
        def mudsc_matching_strategies():
            return [MatchingStrategy("keep_order", match=lambda sims, n_models, blocks, **kw:
                                     [identity_matching(s.shape[0] // n_models, n_models) for s in sims])]
    """


@hookspec
def mudsc_merge_methods() -> Iterable[MergeMethod]:
    """Register merging methods that ``merge(method=NAME)`` and ``mudsc merge --method NAME`` accept.

    Called once when the registry is built. Return :class:`~mudsc_graph.plugin.records.MergeMethod`
    records: a name, the matching strategy it uses (or ``None``: the ``mode`` argument picks one),
    the ``alpha`` it fixes (or ``None``: the argument) and when it needs activation data. The
    built-ins (``average``, ``weight_matching``, ``weight_zip``, ``activation_matching``, ``zipit``,
    ``mudsc``) register through this hook. A matching strategy that no method names is usable as
    a method of its own. Example (Git Re-Basin's weight matching with a plugin's matcher)::

        @hookimpl
        def mudsc_merge_methods():
            return [MergeMethod("greedy_weights", matcher="greedy", alpha=1.0, description="weights only, greedy pairs")]
    """


@hookspec
def mudsc_datasets() -> Iterable[Dataset]:
    """Register data sources for calibration and evaluation (``--data NAME``).

    Called once when the registry is built. Return :class:`~mudsc_graph.plugin.records.Dataset`
    records. Example::

        @hookimpl
        def mudsc_datasets():
            return [Dataset("blobs", load=lambda split: make_blobs(split), classes=4, input_shape=(2,))]
    """
