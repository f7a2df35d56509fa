"""Environment repairs that mudsc applies once, at import.

A torchvision wheel built for CUDA beside a CPU build of torch (what PyPI serves on x86-64 Linux
when torch comes from the CPU index) cannot load its compiled operators. Its Python parts would
still work, but its import fails at once (``RuntimeError: operator torchvision::nms does not
exist``), and with it every package that imports torchvision: timm (which needs it) and transformers
(which imports it when it is installed). :func:`torchvision_without_compiled_ops` lets those
imports work: when torchvision is installed, not yet imported and its compiled library does not
load, it declares the two operator schemas that torchvision's import registers Python kernels for
(the rest of its registrations already check that the library loaded; torchvision means to work
without it and warns about it itself). torchvision's own Python code (transforms, ``FrozenBatchNorm2d``, model definitions) then
works; its compiled operators (``torchvision.ops.nms``, ``roi_align``, ...) raise a clear error
from torchvision when called. Installing a torchvision built for the installed torch removes the
need (and this code then does nothing).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

_LIBRARY: Any = None  # keeps the declared schemas alive


def torchvision_without_compiled_ops() -> bool:
    """Make a torchvision without loadable compiled operators importable; True if it had to."""
    global _LIBRARY
    if _LIBRARY is not None or "torchvision" in sys.modules:
        return False
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.origin:
        return False
    import torch

    folder = os.path.dirname(spec.origin)
    library = next((os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.startswith("_C") and f.endswith((".so", ".pyd"))), None)
    if library is None:
        return False
    try:
        torch.ops.load_library(library)
        return False  # a matching build: nothing to do
    except Exception:
        pass
    try:
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except Exception:  # already defined, or a torch without this API: leave torchvision as it is
        return False
    _LIBRARY = lib
    return True
