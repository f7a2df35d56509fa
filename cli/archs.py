"""Architectures on the command line: ``--arch NAME`` or ``--arch package.module:factory``, ``--arch-opt``.

Shared by every command that builds a model.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from typing import Any, Optional

from mudsc_graph.errors import MudscError, did_you_mean, first_line

#: Batch size of the example inputs that a model is traced and checked with.
EXAMPLE_BATCH = 2
#: Largest seed every seeded generator takes (torch, numpy).
MAX_SEED = 2**63 - 1
#: Most values in one example input (--input-shape): 2**26, a 4096 x 4096 x 4 tensor.
MAX_INPUT_NUMEL = 2**26
#: Help of the --tracer option of every command that analyses a model.
TRACER_HELP = "How to capture the model's graph: auto (torch.fx, and torch.export when fx cannot), fx or export."


class ArchOptionError(MudscError):
    """An ``--arch-opt`` is malformed or not accepted by the architecture's factory."""


def parse_arch_opts(items: Optional[list[str]]) -> dict[str, Any]:
    """``["width=2", "norm=gn"]`` -> ``{"width": 2, "norm": "gn"}``.

    Values are read with :func:`ast.literal_eval` (numbers, booleans, tuples, lists, quoted
    strings, None) and fall back to the raw string.
    """
    opts: dict[str, Any] = {}
    for key, raw in parse_key_values(items, "--arch-opt", "width=2").items():
        try:
            opts[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            opts[key] = raw
    return opts


def parse_model_arch_opts(items: Optional[list[str]], n_models: int) -> list[dict[str, Any]]:
    """``["1:width=4"]`` -> one dict of architecture options per model (``--model-arch-opt``), model
    indices counted from 0 in the order the checkpoints are given; a bad item is one line."""
    per: list[list[str]] = [[] for _ in range(n_models)]
    for item in items or ():
        index, sep, rest = item.partition(":")
        if not sep or not index.strip().isdigit():
            raise ArchOptionError(f"--model-arch-opt {item!r} is not I:KEY=VALUE (for example --model-arch-opt 1:width=4)")
        i = int(index)
        if i >= n_models:
            raise ArchOptionError(f"--model-arch-opt {item!r} names model {i}, but {n_models} checkpoints are given (0 to {n_models - 1})")
        per[i].append(rest)
    return [parse_arch_opts(p) for p in per]


def parse_key_values(items: Optional[list[str]], flag: str, example: str) -> dict[str, str]:
    """``["a=0.3"]`` -> ``{"a": "0.3"}`` for a repeatable ``flag KEY=VALUE`` option; a bad item is one line."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ArchOptionError(f"{flag} {item!r} is not KEY=VALUE (for example {flag} {example})")
        out[key.strip()] = raw.strip()
    return out


def _check_options(arch: Any, opts: dict[str, Any]) -> None:
    """Reject option names the factory does not take, naming the ones it does."""
    try:
        params = list(inspect.signature(arch.factory).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: let the factory judge
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in opts:
        if key not in accepted:
            hint = did_you_mean(key, accepted, n=1, quote=True)
            choices = ", ".join(accepted) or "none"
            raise ArchOptionError(f"architecture {arch.name!r} has no option {key!r}{hint} (its options: {choices})")


def resolve_architecture(name: str, input_shape: Optional[tuple[int, ...]] = None) -> Any:
    """A registered architecture (name or alias), or ``package.module:factory`` for any importable
    factory; such a factory needs ``input_shape`` (one input, no batch) for its example inputs."""
    from mudsc_graph.plugin.records import Architecture
    from mudsc_graph.plugin.registry import get_registry

    registry = get_registry()
    if ":" not in name or registry.arch_aliases.get(name.lower().replace("-", "_")):
        return registry.architecture(name)
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchOptionError(f"cannot import {module_name!r} for --arch {name}: {exc}") from exc
    if module_name == "timm" and not hasattr(module, attr):
        return _timm_architecture(module, attr, input_shape)
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ArchOptionError(f"module {module_name!r} has no attribute {attr!r} (--arch {name})") from None
    if not callable(factory):
        raise ArchOptionError(f"--arch {name} is not callable")

    def example_inputs(batch: int) -> tuple:
        import torch

        if input_shape is None:
            raise ArchOptionError(f"--arch {name} is a factory, not a registered architecture: give --input-shape (e.g. 3,32,32)")
        return (torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0)),)

    return Architecture(attr.replace(".", "_") or "factory", factory=factory, example_inputs=example_inputs)


def _timm_architecture(timm: Any, model_name: str, input_shape: Optional[tuple[int, ...]]) -> Any:
    """``--arch timm:NAME``: ``timm.create_model(NAME, pretrained=False, **options)`` (nothing is
    downloaded), with example inputs of the model's default input size unless ``--input-shape``."""
    import torch

    from mudsc_graph.plugin.records import Architecture

    if model_name not in timm.list_models():
        hint = did_you_mean(model_name, timm.list_models(), otherwise=" (see timm.list_models())")
        raise ArchOptionError(f"timm has no model {model_name!r}{hint}")
    shape = input_shape or tuple(timm.get_pretrained_cfg(model_name).input_size)

    def factory(**options: Any) -> Any:
        return timm.create_model(model_name, pretrained=False, **options)

    def example_inputs(batch: int) -> tuple:
        return (torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0)),)

    return Architecture(f"timm_{model_name}".replace(".", "_"), factory=factory, example_inputs=example_inputs,
                        description=f"timm's {model_name}")


def check_tracer(tracer: str) -> str:
    from mudsc_graph.analysis.trace import TRACERS

    if tracer not in TRACERS:
        raise ArchOptionError(f"--tracer {tracer!r} is not one of {', '.join(TRACERS)}")
    return tracer


def example_or_none(arch: Any) -> Optional[tuple]:
    """The architecture's example inputs (batch 2), or ``None`` for a factory without ``--input-shape``
    (the data's own shape is used then)."""
    try:
        return tuple(arch.example_inputs(EXAMPLE_BATCH))
    except ArchOptionError:
        return None


def parse_shape(text: Optional[str]) -> Optional[tuple[int, ...]]:
    """``"3,32,32"`` -> ``(3, 32, 32)``."""
    if not text:
        return None
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise ArchOptionError(f"--input-shape {text!r} is not a list of integers like 3,32,32") from None
    if not shape or any(n <= 0 for n in shape):
        raise ArchOptionError(f"--input-shape {text!r} must be positive integers like 3,32,32")
    numel = 1
    for n in shape:
        numel *= n
    if numel > MAX_INPUT_NUMEL:
        raise ArchOptionError(
            f"--input-shape {text!r} is {numel:.3g} values per input (at most {MAX_INPUT_NUMEL:.3g}); give the shape of one input, "
            "without the batch axis, e.g. 3,224,224"
        )
    return shape


def build_model(arch: Any, opts: dict[str, Any], seed: int = 0) -> Any:
    """Build ``arch`` with ``opts`` (checked against the factory's signature), in eval mode."""
    import torch

    from torch import nn

    _check_options(arch, opts)
    torch.manual_seed(seed)
    try:
        model = arch.build(**opts)
    except MudscError:
        raise
    except Exception as exc:  # the factory is the user's (or a plugin's) code: say what it said
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        if opts:
            shown = " ".join(f"{k}={v!r}" for k, v in opts.items())
            raise ArchOptionError(f"architecture {arch.name!r} rejected the options {shown}: {reason}") from exc
        raise ArchOptionError(f"building architecture {arch.name!r} failed: {reason}") from exc
    if not isinstance(model, nn.Module):
        raise ArchOptionError(
            f"architecture {arch.name!r} built a {type(model).__name__}, not a torch.nn.Module; --arch package.module:factory "
            "must name a function that returns the model"
        )
    return model.eval()


def build_architecture(name: str, opts: dict[str, Any], input_shape: Optional[tuple[int, ...]] = None) -> tuple[Any, Any, tuple]:
    """Resolve ``name``; return ``(architecture, model in eval mode, example inputs)``.

    The model is built with ``torch.manual_seed(0)``, so its weights are the same on every run.
    """
    arch = resolve_architecture(name, input_shape)
    model = build_model(arch, opts)
    return arch, model, tuple(arch.example_inputs(EXAMPLE_BATCH))


def resolve_device(device: str) -> str:
    """``--device``: auto, cpu, cuda or cuda:N, resolved as the library resolves a merge's device."""
    from mudsc_graph.merging.options import resolve_device as resolve

    if device != "auto" and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ArchOptionError(f"--device {device!r} is not auto, cpu or cuda")
    try:
        return str(resolve(device))
    except MudscError as exc:
        raise ArchOptionError(f"--device: {exc}") from None
