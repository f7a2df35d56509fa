"""The base of every mudsc error, and the errors of the analysis and of plugins.

Every error a user can cause derives from :class:`MudscError`. Messages are one line that says
what is wrong, where (node, module path, op) and what to do. The CLI prints them in red and exits
with code 1 (2 for a command line it cannot parse); anything else is a bug and propagates with its
traceback. :class:`MergeError` is every failure of a merge (its calibration errors,
``CalibrationError``, ``StatisticsError``, ``RepairError`` and ``BatchNormResetError``, derive from
it); the errors of one stage live beside the code that raises them, all subclasses of
:class:`MudscError`: ``InputError``, ``CheckpointError``, ``DataError``, ``HFError``,
``EvaluationError``, ``DemoError``, and the CLI's own.
"""

from __future__ import annotations

from typing import Callable, Iterable


def first_line(exc: BaseException, strip: str = "") -> str:
    """The first line of an exception's message (ANSI colour codes removed), ``strip`` characters
    taken off its end; the exception's type name when the message is empty. For one-line errors
    that quote what a library said."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = (text.splitlines() or [""])[0].strip().rstrip(strip)
    return line or type(exc).__name__


def did_you_mean(word: str, choices: Iterable[str], *, n: int = 3, cutoff: float = 0.6, quote: bool = False,
                 shown: Callable[[str], str] = str, otherwise: str = "") -> str:
    """``"; did you mean a, b?"``: the (at most ``n``) choices closest to ``word`` for an error
    message, each shown through ``shown`` (quoted with ``quote``); ``otherwise`` when none is close."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=cutoff)
    names = [repr(shown(c)) if quote else shown(c) for c in close]
    return f"; did you mean {', '.join(names)}?" if names else otherwise


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


class MergeError(MudscError):
    """Merging failed (incompatible models, bad options, calibration data that cannot be used)."""


class SpecError(MudscError):
    """A MergeSpec does not fit the model or permutation it is used with."""
