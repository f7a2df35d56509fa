"""The error hierarchy of mudsc.

Every error a user can cause derives from :class:`MudscError`. Messages are one line that says
what is wrong, where (node, module path, op) and what to do. The CLI prints them in red and exits
with code 1; anything else is a bug and propagates with its traceback.
"""

from __future__ import annotations


class MudscError(Exception):
    """Base class of every user-facing mudsc error."""


class TraceError(MudscError):
    """``torch.fx`` could not trace the model (data-dependent control flow, unsupported Python)."""


class AnalysisError(MudscError):
    """A propagation pass failed; the message names the pass, the node and the module path."""


class UnsupportedOpError(AnalysisError):
    """In strict mode: an op that no layer handler understands touched a permutable space."""


class PluginError(MudscError):
    """A plugin is invalid or two plugins register the same name or target."""


class SpecCheckError(MudscError):
    """A permutation that the MergeSpec calls valid changed the model's output."""


class SpecError(MudscError):
    """A MergeSpec does not fit the model or permutation it is used with."""
