"""Importers: .npy arrays and folders of torch state dicts become runs, or nothing at all."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import zarr

import koopkit
from koopkit.errors import (
    ImportFailedError,
    InvalidRunIdError,
    KoopkitError,
    RunExistsError,
    ShapeChangedError,
)
from koopkit.store.importers import import_npy, import_torch
from koopkit.store.location import open_root
from koopkit.store.validate import validate_store


class WritesMarker:
    """Unpickling this runs code: it creates the file named by ``MARKER``."""

    marker = ""

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _runs(url):
    try:
        return list(koopkit.open_store(url).runs)
    except KoopkitError:
        return []


# --------------------------------------------------------------------------------------------
# .npy


@pytest.mark.parametrize(
    "dtype, stored", [("float32", "float32"), ("float64", "float64"), ("int16", "float32")]
)
def test_import_npy_round_trip(tmp_path, dtype, stored):
    data = (np.random.default_rng(0).standard_normal((150, 7)) * 100).astype(dtype)
    np.save(tmp_path / "x.npy", data)
    url = tmp_path / "s.zarr"
    assert import_npy(tmp_path / "x.npy", url, "imported/a", tags={"width": 7, "opt": "sgd"}) == 150
    store = koopkit.open_store(url)
    info = store.run("imported/a")
    assert info.status == "complete" and info.tags == {"width": 7, "opt": "sgd"}
    assert info.attrs["source"]["kind"] == "npy"
    assert store.steps("imported/a").tolist() == list(range(150))
    values = np.asarray(store.array("imported/a"))
    assert values.dtype == np.dtype(stored)
    np.testing.assert_array_equal(values, data.astype(stored))
    attrs = store.root["runs/imported/a/params"].attrs.asdict()
    assert attrs["kind"] == "full"
    assert attrs["tensors"] == [{"name": "x", "offset": 0, "shape": [7], "dtype": dtype}]
    assert validate_store(url) == ([], 1)


@pytest.mark.parametrize(
    "array, match",
    [
        (np.arange(5.0), "2-D"),
        (np.zeros((0, 3)), "non-empty"),
        (np.zeros((2, 2, 2)), "2-D"),
        (np.array([["a", "b"]]), "numeric"),
        (np.ones((3, 2), dtype=complex), "numeric"),
    ],
    ids=["1-D", "empty", "3-D", "strings", "complex"],
)
def test_import_npy_refuses_what_is_not_a_trajectory(tmp_path, array, match):
    np.save(tmp_path / "x.npy", array)
    with pytest.raises(ImportFailedError, match=match):
        import_npy(tmp_path / "x.npy", tmp_path / "s.zarr", "a")
    assert _runs(tmp_path / "s.zarr") == []


def test_import_npy_refuses_object_arrays_without_unpickling(tmp_path):
    WritesMarker.marker = str(tmp_path / "pwned")
    np.save(tmp_path / "x.npy", np.array([[WritesMarker()]], dtype=object), allow_pickle=True)
    with pytest.raises(ImportFailedError, match="object"):
        import_npy(tmp_path / "x.npy", tmp_path / "s.zarr", "a")
    assert not (tmp_path / "pwned").exists()
    assert _runs(tmp_path / "s.zarr") == []


def test_import_npy_missing_or_garbage_file(tmp_path):
    with pytest.raises(ImportFailedError, match="No such file"):
        import_npy(tmp_path / "missing.npy", tmp_path / "s.zarr", "a")
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ImportFailedError, match="junk.npy") as info:
        import_npy(tmp_path / "junk.npy", tmp_path / "s.zarr", "a")
    # np.load would read it as a pickle and suggest allow_pickle: never say that
    assert "not start with the .npy magic" in str(info.value)
    assert "pickle" not in str(info.value)
    (tmp_path / "text").write_text("step,loss\n0,1.0\n")
    with pytest.raises(ImportFailedError, match=r"^Invalid \.npy file .*/text': it does not start"):
        import_npy(tmp_path / "text", tmp_path / "s.zarr", "a")


@pytest.mark.parametrize("run_id", ["..", "../outside", "/abs", "a/../../b", "a\x00b", "a b"])
def test_importers_refuse_invalid_run_ids(tmp_path, run_id):
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    (tmp_path / "ckpts").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "ckpts" / "step_1.pt")
    url = tmp_path / "deep" / "s.zarr"
    with pytest.raises(InvalidRunIdError):
        import_npy(tmp_path / "x.npy", url, run_id)
    with pytest.raises(InvalidRunIdError):
        import_torch(tmp_path / "ckpts", url, run_id)
    assert _runs(url) == []
    assert not (tmp_path / "outside").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "deep" / "outside").exists()


def test_import_into_an_existing_run_is_refused(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    np.save(tmp_path / "y.npy", np.zeros((4, 2)))
    url = tmp_path / "s.zarr"
    import_npy(tmp_path / "x.npy", url, "a")
    with pytest.raises(RunExistsError) as refused:
        import_npy(tmp_path / "y.npy", url, "a")
    assert "did not finish" not in str(refused.value)
    np.testing.assert_array_equal(np.asarray(koopkit.open_store(url).array("a")), np.ones((3, 2)))


def test_a_run_left_by_a_killed_import_is_named_as_unfinished(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    url = tmp_path / "s.zarr"
    import_npy(tmp_path / "x.npy", url, "a")
    zarr.open_group(str(url), mode="r+")["runs/a"].attrs["status"] = "recording"  # as killed
    with pytest.raises(RunExistsError, match=r"status 'recording'.*remove runs/a to reuse"):
        import_npy(tmp_path / "x.npy", url, "a")


# --------------------------------------------------------------------------------------------
# torch checkpoints


def _checkpoints(folder, steps, shapes=None, wrap=None, dtype=torch.float32, name="ckpt_{}.pt"):
    folder.mkdir(exist_ok=True)
    shapes = shapes or {}
    states = {}
    g = torch.Generator().manual_seed(0)
    for step in steps:
        state = {
            "layer.weight": torch.randn(*shapes.get(step, (3, 2)), generator=g).to(dtype),
            "layer.bias": torch.randn(3, generator=g).to(dtype),
            "bn.num_batches_tracked": torch.tensor(step),
        }
        states[step] = state
        obj = state if wrap is None else wrap(state, step)
        torch.save(obj, folder / name.format(step))
    return states


def _flat(state, names=("layer.weight", "layer.bias")):
    return torch.cat([state[n].reshape(-1).float() for n in names]).numpy()


def test_import_torch_round_trip(tmp_path):
    steps = [0, 1, 2, 5, 10, 20, 40]
    states = _checkpoints(tmp_path / "ckpts", steps)
    url = tmp_path / "s.zarr"
    assert import_torch(tmp_path / "ckpts", url, "torch/run", tags={"seed": 3}) == len(steps)
    store = koopkit.open_store(url)
    assert store.steps("torch/run").tolist() == steps  # numeric order, not file-name order
    np.testing.assert_array_equal(
        np.asarray(store.array("torch/run")), np.stack([_flat(states[s]) for s in steps])
    )
    attrs = store.root["runs/torch/run/params"].attrs.asdict()
    assert [t["name"] for t in attrs["tensors"]] == ["layer.weight", "layer.bias"]
    assert attrs["tensors"][0]["shape"] == [3, 2]
    assert attrs["kind"] == "full"  # the integer buffer num_batches_tracked is no parameter
    assert store.run("torch/run").tags == {"seed": 3}
    tree = koopkit.open_run(url, "torch/run")
    np.testing.assert_array_equal(
        tree.koopkit.tensor("layer.weight").values,
        np.stack([states[s]["layer.weight"] for s in steps]),
    )
    assert validate_store(url) == ([], 1)


def test_import_torch_many_checkpoints_cross_a_chunk(tmp_path):
    steps = list(range(0, 140, 2))
    states = _checkpoints(tmp_path / "ckpts", steps)
    url = tmp_path / "s.zarr"
    import_torch(tmp_path / "ckpts", url, "a")
    np.testing.assert_array_equal(
        np.asarray(koopkit.open_store(url).array("a")), np.stack([_flat(states[s]) for s in steps])
    )
    assert validate_store(url)[0] == []


def test_import_torch_step_entries_nesting_regex_and_half_precision(tmp_path):
    states = _checkpoints(
        tmp_path / "ckpts",
        [3, 1, 2],
        wrap=lambda state, step: {"model": state, "global_step": step * 100, "epoch": 1},
        dtype=torch.bfloat16,
        name="epoch_{}.pth",
    )
    url = tmp_path / "s.zarr"
    import_torch(tmp_path / "ckpts", url, "a", params=r"\.bias$")
    store = koopkit.open_store(url)
    assert store.steps("a").tolist() == [100, 200, 300]
    values = np.asarray(store.array("a"))
    assert values.dtype == np.float32
    np.testing.assert_array_equal(
        values, np.stack([_flat(states[s], ["layer.bias"]) for s in (1, 2, 3)])
    )
    attrs = store.root["runs/a/params"].attrs.asdict()
    assert attrs["kind"] == "subset"
    assert attrs["tensors"] == [
        {"name": "layer.bias", "offset": 0, "shape": [3], "dtype": "bfloat16"}
    ]


@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
def test_import_torch_refuses_a_checkpoint_that_would_run_code(tmp_path, how):
    folder = tmp_path / "ckpts"
    _checkpoints(folder, [0, 1])
    WritesMarker.marker = str(tmp_path / "pwned")
    evil = {"layer.weight": torch.zeros(3, 2), "layer.bias": torch.zeros(3), "x": WritesMarker()}
    if how == "torch.save":
        torch.save(evil, folder / "ckpt_2.pt")
    else:
        with open(folder / "ckpt_2.pt", "wb") as f:
            pickle.dump(evil, f)
    url = tmp_path / "s.zarr"
    with pytest.raises(ImportFailedError, match="weights_only") as caught:
        import_torch(folder, url, "a")
    assert "ckpt_2.pt" in str(caught.value)
    assert not (tmp_path / "pwned").exists()
    assert _runs(url) == []


def test_import_torch_mismatched_shapes_leave_nothing(tmp_path):
    _checkpoints(tmp_path / "ckpts", [0, 1, 2, 3], shapes={2: (4, 2)})
    url = tmp_path / "s.zarr"
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    import_npy(tmp_path / "x.npy", url, "kept")
    with pytest.raises(ShapeChangedError, match="layer.weight"):
        import_torch(tmp_path / "ckpts", url, "nested/a")
    assert _runs(url) == ["kept"]
    assert not (url / "runs" / "nested" / "a").exists()
    assert validate_store(url) == ([], 1)


def test_import_torch_missing_tensor_in_a_later_checkpoint(tmp_path):
    states = _checkpoints(tmp_path / "ckpts", [0, 1])
    del states[1]["layer.bias"]
    torch.save(states[1], tmp_path / "ckpts" / "ckpt_1.pt")
    with pytest.raises(ShapeChangedError, match="layer.bias"):
        import_torch(tmp_path / "ckpts", tmp_path / "s.zarr", "a")
    assert _runs(tmp_path / "s.zarr") == []


def test_import_torch_refusals(tmp_path):
    url = tmp_path / "s.zarr"
    with pytest.raises(ImportFailedError, match="folder"):
        import_torch(tmp_path / "missing", url, "a")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no checkpoints")
    with pytest.raises(ImportFailedError, match="No checkpoints"):
        import_torch(tmp_path / "empty", url, "a")
    _checkpoints(tmp_path / "dup", [1], name="a_{}.pt")
    _checkpoints(tmp_path / "dup", [1], name="b_{}.pt")
    with pytest.raises(ImportFailedError, match="share a step"):
        import_torch(tmp_path / "dup", url, "a")
    (tmp_path / "nostep2").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "nostep2" / "final.pt")
    with pytest.raises(ImportFailedError, match="step"):
        import_torch(tmp_path / "nostep2", url, "a")
    (tmp_path / "notensors").mkdir()
    torch.save({"lr": 0.1, "step": 3}, tmp_path / "notensors" / "ckpt_3.pt")
    with pytest.raises(ImportFailedError, match="no tensors"):
        import_torch(tmp_path / "notensors", url, "a")
    _checkpoints(tmp_path / "ok", [0, 1])
    with pytest.raises(ImportFailedError, match="matches"):
        import_torch(tmp_path / "ok", url, "a", params="^nothing$")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "ckpt_1.pt").write_bytes(b"\x00garbage")
    with pytest.raises(ImportFailedError, match="ckpt_1.pt"):
        import_torch(tmp_path / "junk", url, "a")
    assert _runs(url) == []


# --------------------------------------------------------------------------------------------
# review: odd inputs


def test_import_npy_big_endian_float64_keeps_its_precision(tmp_path):
    data = np.random.default_rng(1).standard_normal((5, 3)).astype(">f8")
    np.save(tmp_path / "x.npy", data)
    url = tmp_path / "s.zarr"
    import_npy(tmp_path / "x.npy", url, "a")
    store = koopkit.open_store(url)
    values = np.asarray(store.array("a"))
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, data)
    assert store.root["runs/a/params"].attrs["tensors"][0]["dtype"] == "float64"


def test_import_npy_memory_is_bounded_by_the_chunk_size(tmp_path, monkeypatch):
    """A wide row is written a few rows at a time, never ROWS_PER_WRITE rows at once."""
    monkeypatch.setattr("koopkit.store.importers.CHUNK_BYTES", 10 * 100 * 4)
    data = np.random.default_rng(2).standard_normal((95, 100)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    url = tmp_path / "s.zarr"
    assert import_npy(tmp_path / "x.npy", url, "a") == 95
    store = koopkit.open_store(url)
    assert store.root["runs/a/params/value"].chunks[0] == 10
    np.testing.assert_array_equal(np.asarray(store.array("a")), data)
    assert validate_store(url) == ([], 1)


def test_failed_nested_import_leaves_its_run_ids_usable(tmp_path):
    _checkpoints(tmp_path / "ckpts", [0, 1, 2], shapes={2: (4, 2)})
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    url = tmp_path / "s.zarr"
    import_npy(tmp_path / "x.npy", url, "deep/kept")
    with pytest.raises(ShapeChangedError):
        import_torch(tmp_path / "ckpts", url, "deep/er/a")
    assert not (url / "runs" / "deep" / "er").exists()  # the group made for it went too
    assert _runs(url) == ["deep/kept"]
    import_npy(tmp_path / "x.npy", url, "deep/er")  # neither refused nor "already exists"
    assert sorted(_runs(url)) == ["deep/er", "deep/kept"]
    assert validate_store(url) == ([], 2)


def test_import_into_a_group_of_runs_names_it(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    url = tmp_path / "s.zarr"
    import_npy(tmp_path / "x.npy", url, "fcn/a")
    with pytest.raises(InvalidRunIdError, match="names a group of runs"):
        import_npy(tmp_path / "x.npy", url, "fcn")


@pytest.mark.parametrize("step", [-1, 2**70])
def test_import_torch_refuses_a_step_out_of_range(tmp_path, step):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "step": step}, folder / "a.pt")
    torch.save({"model": {"w": torch.ones(2)}, "step": 5}, folder / "b.pt")
    url = tmp_path / "s.zarr"
    with pytest.raises(ImportFailedError, match=r"Invalid step .* of 'a\.pt'"):
        import_torch(folder, url, "a")
    assert _runs(url) == []


def test_import_torch_invalid_params_regex(tmp_path):
    _checkpoints(tmp_path / "ckpts", [0, 1])
    with pytest.raises(ImportFailedError, match=r"Invalid params regex '\['"):
        import_torch(tmp_path / "ckpts", tmp_path / "s.zarr", "a", params="[")


# --------------------------------------------------------------------------------------------
# review: dtypes, steps, keys, leftovers and unreadable files


def test_import_torch_keeps_float64(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    states = {}
    for step in (0, 1):
        states[step] = {
            "w": torch.tensor([1 + 2**-40, step + 0.1], dtype=torch.float64),
            "b": torch.tensor([0.1, 1 / 3], dtype=torch.float32),
        }
        torch.save(states[step], folder / f"ckpt_{step}.pt")
    url = tmp_path / "s.zarr"
    import_torch(folder, url, "a")
    store = koopkit.open_store(url)
    values = np.asarray(store.array("a"))
    assert values.dtype == np.float64
    expected = [np.concatenate([states[s]["w"].numpy(), states[s]["b"].numpy()]) for s in (0, 1)]
    np.testing.assert_array_equal(values, np.stack(expected))  # float32 values stay exact
    tensors = store.root["runs/a/params"].attrs["tensors"]
    assert [t["dtype"] for t in tensors] == ["float64", "float32"]
    assert validate_store(url) == ([], 1)


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint32"])
def test_import_npy_wide_integers_are_exact(tmp_path, dtype):
    data = np.array([[2**24 + 1, 0], [3, 2**31 - 1]]).astype(dtype)
    np.save(tmp_path / "x.npy", data)
    url = tmp_path / "s.zarr"
    import_npy(tmp_path / "x.npy", url, "a")
    values = np.asarray(koopkit.open_store(url).array("a"))
    assert values.dtype == np.float64
    np.testing.assert_array_equal(values, data.astype(np.int64))


def test_import_npy_refuses_integers_float64_would_round(tmp_path):
    np.save(tmp_path / "x.npy", np.array([[0, 1], [2**53 + 1, 2]], dtype=np.int64))
    url = tmp_path / "s.zarr"
    with pytest.raises(ImportFailedError, match=r"exceed 2\*\*53"):
        import_npy(tmp_path / "x.npy", url, "a")
    assert not url.exists()


def test_import_torch_steps_from_integer_tensors(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for name, step in (("a", torch.tensor(100)), ("b", torch.tensor(200, dtype=torch.int32))):
        torch.save({"model": {"w": torch.ones(2) * step}, "step": step}, folder / f"{name}.pt")
    url = tmp_path / "s.zarr"
    import_torch(folder, url, "a")
    assert koopkit.open_store(url).steps("a").tolist() == [100, 200]


@pytest.mark.skipif(
    not hasattr(torch.serialization, "safe_globals"), reason="torch < 2.5: no safe_globals"
)
def test_import_torch_steps_from_numpy_integers(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "global_step": np.int64(300)}, folder / "a.pt")
    # weights_only loads a numpy scalar only where the caller allows its globals
    allowed = [np.int64(0).__reduce__()[0], np.dtype, type(np.dtype(np.int64))]
    url = tmp_path / "s.zarr"
    with torch.serialization.safe_globals(allowed):
        import_torch(folder, url, "a")
    assert koopkit.open_store(url).steps("a").tolist() == [300]


@pytest.mark.parametrize(
    "entries, match",
    [
        ({"step": True}, r"Invalid 'step' entry of 'ckpt_1.pt': a bool"),
        ({"step": torch.tensor(True)}, r"Invalid 'step' entry of 'ckpt_1.pt': a bool"),
        ({"global_step": 1.0}, r"Invalid 'global_step' entry of 'ckpt_1.pt': a float"),
        ({"step": 1, "global_step": torch.tensor(2)}, "has step 1 and global_step 2"),
    ],
    ids=["bool", "bool-tensor", "float", "step-and-global-step-differ"],
)
def test_import_torch_refuses_bad_step_entries(tmp_path, entries, match):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, **entries}, folder / "ckpt_1.pt")
    url = tmp_path / "s.zarr"
    with pytest.raises(ImportFailedError, match=match):
        import_torch(folder, url, "a")
    assert not url.exists()


def test_import_torch_equal_step_and_global_step_are_one_step(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "step": 7, "global_step": 7}, folder / "x.pt")
    import_torch(folder, tmp_path / "s.zarr", "a")
    assert koopkit.open_store(tmp_path / "s.zarr").steps("a").tolist() == [7]


def test_import_torch_refuses_keys_that_are_not_names(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"w": torch.ones(2), 1: torch.ones(3)}, folder / "ckpt_0.pt")
    url = tmp_path / "s.zarr"
    with pytest.raises(ImportFailedError, match="under the key 1; expected a state dict"):
        import_torch(folder, url, "a")
    assert not url.exists()


def test_a_refused_import_creates_no_store(tmp_path):
    states = _checkpoints(tmp_path / "ckpts", [0, 1])
    del states[1]["layer.bias"]
    torch.save(states[1], tmp_path / "ckpts" / "ckpt_1.pt")
    url = tmp_path / "new" / "s.zarr"
    with pytest.raises(ShapeChangedError, match="layer.bias"):
        import_torch(tmp_path / "ckpts", url, "a")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("existing", [False, True, "through a missing folder"])
def test_a_failed_write_removes_the_store_it_created(tmp_path, monkeypatch, existing):
    """Only a store this import created: not one it reached as missing/../s.zarr either."""
    _checkpoints(tmp_path / "ckpts", [0, 1])
    np.save(tmp_path / "x.npy", np.ones((3, 2)))
    url = tmp_path / "new" / "s.zarr"
    if existing is True:
        import_npy(tmp_path / "x.npy", url, "kept")
    if existing == "through a missing folder":  # an empty store, reached another way
        open_root(url, writable=True)
        url = tmp_path / "new" / "missing" / ".." / "s.zarr"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("koopkit.store.importers.RunWriter.append", disk_full)
    with pytest.raises(OSError, match="No space"):
        import_torch(tmp_path / "ckpts", url, "a")
    with pytest.raises(OSError, match="No space"):
        import_npy(tmp_path / "x.npy", url, "b")
    if existing is True:
        assert _runs(url) == ["kept"] and validate_store(url) == ([], 1)
    elif existing:
        assert (tmp_path / "new" / "s.zarr" / "zarr.json").is_file()
    else:
        assert not (tmp_path / "new").exists()


def test_import_torch_skips_directories_and_reads_any_suffix_case(tmp_path):
    states = _checkpoints(tmp_path / "ckpts", [0, 1], name="ckpt_{}.PT")
    (tmp_path / "ckpts" / "ckpt_2.pt").mkdir()
    url = tmp_path / "s.zarr"
    assert import_torch(tmp_path / "ckpts", url, "a") == 2
    np.testing.assert_array_equal(
        np.asarray(koopkit.open_store(url).array("a")), np.stack([_flat(states[s]) for s in (0, 1)])
    )


@pytest.mark.parametrize("content", ["empty", "truncated-zip", "garbage", "empty-zip"])
def test_import_torch_unreadable_files_are_named_as_such(tmp_path, content):
    folder = tmp_path / "ckpts"
    _checkpoints(folder, [0])
    whole = (folder / "ckpt_0.pt").read_bytes()
    data = {
        "empty": b"",
        "truncated-zip": whole[: len(whole) // 2],
        "garbage": b"\x00garbage",
        "empty-zip": b"PK\x05\x06" + bytes(18),
    }[content]
    (folder / "ckpt_1.pt").write_bytes(data)
    url = tmp_path / "s.zarr"
    with pytest.raises(ImportFailedError, match="^Cannot read 'ckpt_1.pt' as a torch checkpoint: "):
        import_torch(folder, url, "a")
    assert not url.exists()


def test_import_torch_model_entry_that_is_no_state_dict(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (1, 2):
        torch.save(
            {"model": {"name": "mlp", "depth": 2}, "model_state_dict": {"w": torch.ones(2) * step}},
            folder / f"ckpt_{step}.pt",
        )
    url = tmp_path / "s.zarr"
    import_torch(folder, url, "a")
    np.testing.assert_array_equal(
        np.asarray(koopkit.open_store(url).array("a")), [[1.0, 1.0], [2.0, 2.0]]
    )


def test_import_torch_refuses_complex_tensors(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    for step in (0, 1):
        state = {"w": torch.ones(2), "z": torch.ones(2, dtype=torch.complex64)}
        torch.save(state, folder / f"ckpt_{step}.pt")
    url = tmp_path / "s.zarr"
    with pytest.raises(ImportFailedError, match=r"complex tensors 'z' \(complex64\)"):
        import_torch(folder, url, "a")
    assert not url.exists()
    import_torch(folder, url, "a", params="^w$")  # selecting the real ones imports them
    assert koopkit.open_store(url).root["runs/a/params"].attrs["kind"] == "subset"


def test_import_torch_refuses_a_tensor_whose_dtype_changes(tmp_path):
    _checkpoints(tmp_path / "ckpts", [0, 1])
    _checkpoints(tmp_path / "ckpts", [2], dtype=torch.bfloat16)
    url = tmp_path / "s.zarr"
    with pytest.raises(
        ImportFailedError, match=r"'ckpt_2.pt' has tensor 'layer.weight' as bfloat16, 'ckpt_0.pt'"
    ):
        import_torch(tmp_path / "ckpts", url, "a")
    assert not url.exists()
