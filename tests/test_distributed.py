"""Sharded calibration with torch.distributed: two gloo processes on CPU give the merge that one
process gives (to float rounding), BatchNorm statistics included; a failure on one rank raises on
every rank instead of leaving the others waiting; ``torchrun ... -m mudsc_cli merge`` writes one
checkpoint, equal to the single-process command's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mudsc_graph.merging import distributed

sys.path.insert(0, str(Path(__file__).parent))
import distributed_worker  # noqa: E402

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _run_ranks(tmp_path: Path, scenario: str, world: int = 2) -> Path:
    out = tmp_path / scenario
    out.mkdir()
    init = tmp_path / f"{scenario}.init"
    procs = [
        subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(r), str(world), str(init), str(out), scenario], env=ENV)
        for r in range(world)
    ]
    for p in procs:
        assert p.wait(timeout=300) == 0
    return out


def test_two_gloo_ranks_merge_what_one_process_merges(tmp_path):
    out = _run_ranks(tmp_path, "good")
    want = distributed_worker.merges("good")
    assert {"zip", "align", "zipit", "zip_refit"} <= set(want)
    for name, state in want.items():
        for rank in (0, 1):
            got = torch.load(out / f"rank{rank}-{name}.pt", weights_only=True)
            assert set(got) == set(state)
            # the refit solves a least-squares system per layer from moments summed in another order: a little looser
            tol = dict(rtol=1e-4, atol=1e-4) if "refit" in name else dict(rtol=0, atol=1e-5)
            for k, v in state.items():  # BatchNorm running statistics are among them
                torch.testing.assert_close(got[k], v, **tol, msg=f"{name}, rank {rank}: {k}")
        assert any("running_var" in k for k in state)


def test_two_gloo_ranks_repair_what_one_process_repairs(tmp_path):
    """REPAIR's statistics are sums over batches too: 3 and 2 batches on two ranks give the
    single-process repaired merge (GroupNorm models, whose channels REPAIR rescales)."""
    out = _run_ranks(tmp_path, "repair")
    want = distributed_worker.merges("repair")
    for name, state in want.items():
        for rank in (0, 1):
            got = torch.load(out / f"rank{rank}-{name}.pt", weights_only=True)
            for k, v in state.items():
                torch.testing.assert_close(got[k], v, rtol=0, atol=1e-5, msg=f"{name}, rank {rank}: {k}")


def test_a_failure_on_one_rank_raises_on_every_rank(tmp_path):
    out = _run_ranks(tmp_path, "bad")
    errors = {r: (out / f"rank{r}.err").read_text() for r in (0, 1)}
    assert "calibration batch" in errors[1]  # the rank that ran the bad batch says what was wrong
    assert "rank 1 of the process group failed" in errors[0] and "calibration batch" in errors[0]
    assert not list(out.glob("*.pt"))


def test_without_a_process_group_nothing_is_sharded():
    assert distributed.world() == (0, 1) and not distributed.active()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.together(lambda: 5) == 5
    t = torch.ones(3)
    distributed.all_sum_([t])
    assert torch.equal(t, torch.ones(3))
    assert distributed.init_from_env("cpu") == "cpu" and distributed.writer_turn()


def test_torchrun_merge_writes_one_checkpoint_equal_to_the_single_process_one(tmp_path):
    from mudsc_graph.io.checkpoints import read_checkpoint

    models, _ = distributed_worker.case("good")
    paths = []
    for k, m in enumerate(models):
        paths.append(tmp_path / f"m{k}.pt")
        torch.save(m.state_dict(), paths[-1])
    common = ["merge", *map(str, paths), "--arch", "resnet20", "-o", "width=1", "--data", "digits", "--samples", "120",
              "--batch-size", "40", "--device", "cpu", "--max-iter", "4", "--quiet"]
    run = lambda *a: subprocess.run([sys.executable, *a], env=ENV, capture_output=True, text=True, timeout=300)  # noqa: E731
    one = run("-m", "mudsc_cli", *common, "--out", str(tmp_path / "one.pt"))
    assert one.returncode == 0, one.stderr
    two = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mudsc_cli", *common,
              "--out", str(tmp_path / "two.pt"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_checkpoint(tmp_path / "one.pt").state, read_checkpoint(tmp_path / "two.pt").state
    for k, v in a.items():
        torch.testing.assert_close(b[k], v, rtol=0, atol=1e-5, msg=k)
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt") == ["m0.pt", "m1.pt", "one.pt", "two.pt"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_all_sum_goes_through_the_device_the_backend_needs():
    assert distributed._wire_device("nccl", torch.device("cpu")).type == "cuda"
    assert distributed._wire_device("gloo", torch.device("cuda", 0)).type == "cpu"


def test_the_script_in_the_docs_runs_under_torchrun(tmp_path):
    import re

    text = (HERE.parent / "docs" / "merging.md").read_text()
    (script,) = [b for b in re.findall(r"```py\n(.*?)```", text, re.S) if b.startswith("# merge_script.py")]
    (tmp_path / "merge_script.py").write_text(script)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "merge_script.py"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "merged.pt", weights_only=True)
    assert any(k.endswith("running_var") for k in state) and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# --------------------------------------------------------------------------- no rank waits forever (issue 28)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, port: int, **extra) -> dict:
    return {**ENV, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "MUDSC_DIST_TIMEOUT": "4", **extra}


MERGE = ["-m", "mudsc_cli", "merge", "a.pt", "b.pt", "--arch", "mlp", "--method", "weight_matching", "--no-reset-bn", "--quiet"]


def _one_line(proc, needle):
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr and needle in lines[0], proc.stderr[-2000:]


def test_a_rank_without_its_peer_or_its_port_ends_in_one_line(tmp_path):
    """WORLD_SIZE=2 with no second rank waited forever; a taken MASTER_PORT was a DistNetworkError traceback."""
    import socket

    run = lambda env: subprocess.run([sys.executable, *MERGE, "--out", "m.pt"], env=env, cwd=tmp_path, capture_output=True,  # noqa: E731
                                     text=True, timeout=120)
    _one_line(run(_rank_env(0, _free_port())), "cannot join the process group")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        _one_line(run(_rank_env(0, taken.getsockname()[1])), "cannot join the process group")
    assert not (tmp_path / "m.pt").exists()


def test_a_rank_that_stops_ends_the_others_collectives_in_one_line(tmp_path):
    """A rank stopped (SIGSTOP) or far behind: the others' collective ends after MUDSC_DIST_TIMEOUT."""
    script = (
        "import sys, time\n"
        "from mudsc_graph.merging import distributed as d\n"
        "d.init_from_env('cpu')\n"
        "if d.world()[0] == 1:\n"
        "    time.sleep(30)\n"
        "try:\n"
        "    d.together(lambda: 1)\n"
        "except d.DistributedError as exc:\n"
        "    print('error:', exc, flush=True)\n"
        "    assert exc.abandon_process\n"
        "    import os; os._exit(1)  # as the command line does: the group cannot be torn down\n"
    )
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script], env=_rank_env(r, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in range(2)]
    out, _ = procs[0].communicate(timeout=60)
    procs[1].kill()
    procs[1].wait()
    assert procs[0].returncode == 1 and "another rank stopped, died or is more than 4 s behind" in out, out


def test_ranks_given_different_arguments_refuse_together(tmp_path):
    from mudsc_graph import get_registry

    for k in "ab":
        torch.manual_seed(ord(k))
        torch.save(get_registry().architecture("mlp").build().state_dict(), tmp_path / f"{k}.pt")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *MERGE, "--out", "m.pt", "--data", data, "--seed", "0"], env=_rank_env(r, port),
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r, data in enumerate(["digits", "mnist5k"])]
    for p in procs:
        _, err = p.communicate(timeout=120)
        p.stderr = err
        _one_line(p, "another command line than rank 0")
    assert not (tmp_path / "m.pt").exists()
