"""Copy a finished reproduction run into docs/: the only code of the benchmarks that writes there.

::

    python -m benchmarks.publish [RUN_DIR]     # default benchmark-results/reproduce

``RUN_DIR`` is the output folder of a full, complete ``python -m benchmarks.reproduce.run_all``
(``run_all --publish`` calls this when it is done). Its ``results/run_all.json`` lists the files
the run wrote, and exactly those are copied, to the same place under ``docs/``: ``results.md``
(its link to findings.md rewritten for its new folder), the two PNGs, and ``results/*``. Files of
``docs/results/`` that the run did not write (a measurement added by hand) are left alone. Quick runs and runs with ``--skip`` are refused unless ``--force``.
:func:`copy_into_docs` is how the benchmarks run on their own (``targets``, ``scale``) publish one file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Sequence

from benchmarks import DOCS_DIR, default_out, shown

MANIFEST = "results/run_all.json"


class PublishError(Exception):
    """The folder is not a run that may go into docs/."""


def findings_link(md_dir: Path) -> str:
    """The link from a ``results.md`` in ``md_dir`` to docs/findings.md."""
    return Path(os.path.relpath(DOCS_DIR / "findings.md", Path(md_dir).resolve())).as_posix()


def publish(run_dir: Path, docs: Path = DOCS_DIR, *, force: bool = False) -> list[Path]:
    """Copy the files of the run in ``run_dir`` into ``docs``; returns the paths written."""
    run_dir, docs = Path(run_dir), Path(docs)
    manifest_path = run_dir / MANIFEST
    if not manifest_path.is_file():
        raise PublishError(f"{run_dir} holds no run of python -m benchmarks.reproduce.run_all (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if not force and manifest.get("mode") != "full":
        raise PublishError(f"{run_dir} is a {manifest.get('mode')} run; docs/ takes full runs (--force to publish it anyway)")
    if not force and manifest.get("skipped"):
        raise PublishError(f"{run_dir} left out {', '.join(manifest['skipped'])}; docs/ takes complete runs (--force to publish it anyway)")
    names = list(manifest["files"])
    missing = [n for n in names if not (run_dir / n).is_file()]
    if missing:
        raise PublishError(f"{run_dir} lacks {', '.join(missing)}, which its {MANIFEST} lists")
    if run_dir.resolve() == docs.resolve():
        return []
    written = []
    for name in names:
        src, dst = run_dir / name, docs / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if name == "results.md":
            text = src.read_text().replace(f"]({findings_link(run_dir)})", f"]({findings_link(docs)})")
            dst.write_text(text)
        else:
            shutil.copyfile(src, dst)
        written.append(dst)
    return written


def copy_into_docs(pairs: Sequence[tuple[Path, Path]]) -> list[Path]:
    """Copy single measurement files (``python -m benchmarks.targets --publish``, ``scale
    --publish``) to their places under docs/; refuses a destination outside it."""
    written = []
    for src, dst in pairs:
        if DOCS_DIR.resolve() not in Path(dst).resolve().parents:
            raise PublishError(f"{dst} is not inside {DOCS_DIR}")
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        print(f"published {shown(Path(dst))}")
        written.append(Path(dst))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.publish", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", nargs="?", default=str(shown(default_out("reproduce"))),
                   help="output folder of run_all (default benchmark-results/reproduce)")
    p.add_argument("--docs", default=str(DOCS_DIR), help=argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="publish a quick or partial run too")
    args = p.parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_absolute() and not run_dir.exists():
        run_dir = DOCS_DIR.parent / run_dir  # the default, from another working directory
    try:
        paths = publish(run_dir, Path(args.docs), force=args.force)
    except PublishError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for path in paths:
        print(f"published {shown(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
