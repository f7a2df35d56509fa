"""benchmarks.publish: exactly the files a full run_all lists go into docs/, with the findings link fixed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import publish


def _run(folder: Path, mode: str = "full", skipped: list[str] | None = None) -> Path:
    (folder / "results").mkdir(parents=True)
    link = publish.findings_link(folder)
    (folder / "results.md").write_text(f"# Results\n\nwhy: [findings.md]({link}). CSV: [results/](results/).\n")
    (folder / "dual_space_scatter.png").write_bytes(b"png")
    (folder / "results" / "scale.csv").write_text("a,b\n")
    (folder / "results" / "stray.csv").write_text("not listed\n")
    files = ["results.md", "dual_space_scatter.png", "results/scale.csv", "results/run_all.json"]
    manifest = {"command": "python -m benchmarks.reproduce.run_all", "mode": mode, "skipped": skipped or [], "files": files}
    (folder / "results" / "run_all.json").write_text(json.dumps(manifest))
    return folder


def test_publish_copies_the_listed_files(tmp_path):
    run = _run(tmp_path / "run")
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    (docs / "results" / "by_hand.jsonl").write_text("{}\n")
    written = publish.publish(run, docs)
    assert sorted(p.relative_to(docs).as_posix() for p in written) == [
        "dual_space_scatter.png", "results.md", "results/run_all.json", "results/scale.csv"]
    assert not (docs / "results" / "stray.csv").exists()
    assert (docs / "results" / "by_hand.jsonl").is_file()  # files the run did not write are left alone
    assert f"[findings.md]({publish.findings_link(docs)})" in (docs / "results.md").read_text()


@pytest.mark.parametrize("mode, skipped", [("quick", None), ("full", ["accuracy"])])
def test_publish_refuses_quick_and_partial_runs(tmp_path, mode, skipped):
    run = _run(tmp_path / "run", mode, skipped)
    with pytest.raises(publish.PublishError):
        publish.publish(run, tmp_path / "docs")
    assert publish.publish(run, tmp_path / "docs", force=True)


def test_publish_refuses_a_folder_without_a_run(tmp_path):
    with pytest.raises(publish.PublishError, match="run_all.json"):
        publish.publish(tmp_path, tmp_path / "docs")
