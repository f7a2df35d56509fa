"""Checkpoint I/O: layouts, safe loading, atomic saving, and fit_state_dict's error messages."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import pytest
import torch
from torch import nn

from mudsc_graph import checkpoints
from mudsc_graph.checkpoints import CheckpointError, file_sha256, fit_state_dict, load_checkpoint, save_checkpoint
from mudsc_graph.errors import MudscError


def tiny(out: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, out))


def assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def only_files(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("name", ["m.pt", "m.pth", "m.safetensors"])
def test_round_trip(tmp_path, name):
    state = tiny().state_dict()
    meta = {"method": "mudsc", "alpha": 0.5, "models": ["a.pt", "b.pt"]}
    out = save_checkpoint(tmp_path / name, state, meta)
    assert out == tmp_path / name and only_files(tmp_path) == [name]
    loaded, got = load_checkpoint(out)
    assert_same(loaded, state)
    assert got == meta
    assert all(t.device.type == "cpu" for t in loaded.values())
    fit_state_dict(tiny(), loaded, source=name)


def test_safetensors_breaks_shared_storage_and_non_contiguous(tmp_path):
    w = torch.randn(5, 4)
    state = {"a": w, "b": w, "c": w.t()}  # shared storage and a non-contiguous view
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "s.safetensors", state, {}))
    assert_same(loaded, {k: v.contiguous() for k, v in state.items()})


def test_safetensors_foreign_metadata_kept(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "f.safetensors"), metadata={"format": "pt"})
    _, meta = load_checkpoint(tmp_path / "f.safetensors")
    assert meta == {"format": "pt"}


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "module"])
def test_nested_layouts(tmp_path, key):
    state = tiny().state_dict()
    torch.save({key: state, "epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "n.ckpt")
    loaded, meta = load_checkpoint(tmp_path / "n.ckpt")
    assert_same(loaded, state)
    assert meta == {}


def test_first_nested_dict_of_tensors_wins(tmp_path):
    state = tiny().state_dict()
    torch.save({"model": {"name": "resnet20"}, "state_dict": state}, tmp_path / "n.pt")
    assert_same(load_checkpoint(tmp_path / "n.pt")[0], state)


def test_dataparallel_prefix_stripped(tmp_path):
    state = tiny().state_dict()
    torch.save(OrderedDict((f"module.{k}", v) for k, v in state.items()), tmp_path / "dp.bin")
    assert_same(load_checkpoint(tmp_path / "dp.bin")[0], state)


def test_partial_module_prefix_kept(tmp_path):
    torch.save({"module.a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "p.pt")
    assert set(load_checkpoint(tmp_path / "p.pt")[0]) == {"module.a", "b"}


def test_full_pickled_module_needs_trust(tmp_path):
    model = tiny()
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "full.pt")
    msg = str(err.value)
    assert "--trust-pickle" in msg and "trust_pickle=True" in msg and "full.pt" in msg
    assert "torch.nn.modules.container.Sequential" in msg and "\n" not in msg
    loaded, _ = load_checkpoint(tmp_path / "full.pt", trust_pickle=True)
    assert_same(loaded, model.state_dict())


def test_error_is_a_mudsc_error():
    assert issubclass(CheckpointError, MudscError)


@pytest.mark.parametrize("payload", [b"", b"this is not a checkpoint" * 20, b"PK\x03\x04" + bytes(100)])
@pytest.mark.parametrize("name", ["g.pt", "g.safetensors"])
def test_garbage_file(tmp_path, payload, name):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"^cannot read .*g\.\w+ as a checkpoint: ") as err:
        load_checkpoint(tmp_path / name)
    assert "\n" not in str(err.value)


def test_garbage_file_with_trust_pickle(tmp_path):
    (tmp_path / "g.pt").write_bytes(b"this is not a checkpoint" * 20)
    with pytest.raises(CheckpointError, match="cannot read .* as a checkpoint"):
        load_checkpoint(tmp_path / "g.pt", trust_pickle=True)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="no such file: .*directory"):
        load_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        file_sha256(tmp_path / "nope.pt")


def test_non_tensor_entry_named(tmp_path):
    torch.save({"w": torch.ones(2), "epoch": 3}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="'epoch' is a int, not a tensor"):
        load_checkpoint(tmp_path / "x.pt")


def test_not_a_dict(tmp_path):
    torch.save([torch.ones(2)], tmp_path / "l.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(tmp_path / "l.pt")


def test_wrong_extension(tmp_path):
    with pytest.raises(CheckpointError, match=r"'\.bin'.*\.safetensors or \.pt"):
        save_checkpoint(tmp_path / "m.bin", tiny().state_dict(), {})
    assert only_files(tmp_path) == []


def test_missing_parent_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_checkpoint(tmp_path / "no" / "m.pt", tiny().state_dict(), {})


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(CheckpointError, match="not JSON"):
        save_checkpoint(tmp_path / "m.pt", tiny().state_dict(), {"x": object()})
    assert only_files(tmp_path) == []


@pytest.mark.parametrize("name", ["m.pt", "m.safetensors"])
def test_existing_output_needs_force(tmp_path, name):
    target = tmp_path / name
    target.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="exists; pass --force to overwrite"):
        save_checkpoint(target, tiny().state_dict(), {})
    assert target.read_bytes() == b"precious"
    save_checkpoint(target, tiny().state_dict(), {"v": 2}, force=True)
    assert load_checkpoint(target)[1] == {"v": 2}
    assert only_files(tmp_path) == [name]


@pytest.mark.parametrize(
    ("name", "attr", "exc", "expected"),
    [
        ("m.pt", "torch.save", RuntimeError("boom"), RuntimeError),
        ("m.pt", "torch.save", OSError(28, "No space left on device"), CheckpointError),
        ("m.safetensors", "safetensors.torch.save_file", RuntimeError("boom"), RuntimeError),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch, name, attr, exc, expected, existing):
    target = tmp_path / name
    if existing:
        target.write_bytes(b"old")

    def failing(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise exc

    monkeypatch.setattr(attr, failing)
    with pytest.raises(expected):
        save_checkpoint(target, tiny().state_dict(), {}, force=True)
    assert only_files(tmp_path) == ([name] if existing else [])
    if existing:
        assert target.read_bytes() == b"old"


def test_fit_missing_and_unexpected_keys():
    model = tiny()
    state = {f"extra{i}": torch.ones(1) for i in range(5)}
    state.update({k: v for k, v in model.state_dict().items() if not k.startswith("3.")})
    with pytest.raises(CheckpointError) as err:
        fit_state_dict(model, state, source="a.pt")
    msg = str(err.value)
    assert msg.startswith("a.pt does not fit the architecture: missing keys [3.weight, 3.bias] (2)")
    assert "unexpected keys [extra0, extra1, extra2, ...] (5)" in msg
    assert msg.endswith("check --arch / --arch-opt")


def test_fit_only_missing():
    state = dict(tiny().state_dict())
    del state["0.weight"]
    with pytest.raises(CheckpointError, match=r"missing keys \[0.weight\] \(1\); check") as err:
        fit_state_dict(tiny(), state)
    assert "unexpected" not in str(err.value)


def test_fit_shape_mismatch():
    with pytest.raises(
        CheckpointError,
        match=r"^b.pt: 3.weight has shape \(10, 5\) but the architecture expects \(3, 5\); check --arch-opt \(e.g. num_classes\)$",
    ):
        fit_state_dict(tiny(3), tiny(10).state_dict(), source="b.pt")


def test_fit_rejects_non_finite():
    model = tiny()
    for bad in (float("nan"), float("inf")):
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["1.running_var"][2] = bad
        with pytest.raises(CheckpointError, match=r"^c.pt: 1.running_var contains NaN or inf values"):
            fit_state_dict(tiny(), state, source="c.pt")


def test_fit_loads_values():
    src, dst = tiny(), nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    fit_state_dict(dst, src.state_dict())
    assert_same(dst.state_dict(), src.state_dict())


def test_sha256(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "_CHUNK", 7)  # exercise the streaming loop
    data = bytes(range(256)) * 3
    (tmp_path / "f.bin").write_bytes(data)
    assert file_sha256(tmp_path / "f.bin") == hashlib.sha256(data).hexdigest()
    (tmp_path / "e.bin").write_bytes(b"")
    assert file_sha256(tmp_path / "e.bin") == hashlib.sha256(b"").hexdigest()
