"""mudsc_graph: the core of mudsc. Trace any model into a graph IR, infer its merge groups, merge.

    >>> spec = mudsc_graph.analyze(model, (x,))
    >>> spec.check(model, (x,))        # a random valid permutation leaves the output unchanged
    >>> result = mudsc_graph.merge([model_a, model_b], data=batches, method="mudsc", mode="zip")
"""

from . import _compat

_compat.torchvision_without_compiled_ops()

from .analysis.pipeline import Analysis, analyze, analyze_full  # noqa: E402
from .errors import (
    AnalysisError,
    MudscError,
    PluginError,
    SpecCheckError,
    SpecError,
    TraceError,
    UnsupportedOpError,
)
from .merging.api import MergeResult, PreparedMerge, merge, prepare
from .merging.options import MergeError, MergeOptions
from .plugin.hookspecs import hookimpl
from .plugin.records import (
    Architecture,
    Dataset,
    LayerHandler,
    MatcherParameter,
    MatchingStrategy,
    MergeMethod,
)
from .plugin.registry import Registry, get_registry, registry_with, reset_registry
from .spec.merge_spec import Group, MergeSpec, Probe

#: The one place the version is written (pyproject.toml reads it; the CLI and merge metadata report it).
__version__ = "0.1.0"

__all__ = [
    "Analysis", "AnalysisError", "Architecture", "Dataset", "Group", "LayerHandler", "MatcherParameter", "MatchingStrategy", "MergeMethod", "MergeSpec", "MudscError", "PluginError",
    "Probe", "Registry", "SpecCheckError", "SpecError", "TraceError", "UnsupportedOpError", "analyze", "analyze_full",
    "get_registry", "hookimpl", "merge", "MergeResult", "MergeError", "MergeOptions", "prepare", "PreparedMerge", "registry_with",
    "reset_registry",
]
