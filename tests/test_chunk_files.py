"""Chunk files written directly are the files zarr writes, and fail without leaving debris."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import koopkit
from koopkit.errors import StoreError, WriteFailedError
from koopkit.store import writer
from koopkit.store.chunk_files import ChunkFiles
from koopkit.store.validate import validate_store
from koopkit.store.writer import RunWriter, SeriesSpec

ROW_SHAPES = {(): (), (7,): ("param",), (3, 5): ("sample", "feature")}


def _record(url, row_shape, dtype, chunk_steps, batches, flush_after, blank=()):
    """Append the batches (then flush where asked) and return every row written.

    Batches in ``blank`` hold only the fill value: zarr stores no chunk made of it.
    """
    run = RunWriter(url, "r")
    run.add_series(
        SeriesSpec("s", row_shape, dtype, chunk_steps=chunk_steps, row_dims=ROW_SHAPES[row_shape])
    )
    rng = np.random.default_rng(0)
    step, written = 0, []
    for i, count in enumerate(batches):
        rows = (rng.standard_normal((count, *row_shape)) * 100).astype(dtype)
        if i in blank:
            rows[...] = np.nan if rows.dtype.kind == "f" else 0
        run.append("s", np.arange(step, step + count), rows)
        written.append(rows)
        step += count
        if i in flush_after:
            run.flush()  # writes a partial chunk row: the next append merges into it
    run.close()
    return np.concatenate(written)


def _chunk_files(root: Path) -> dict[str, bytes]:
    folder = root / "runs" / "r" / "s"
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file() and "/c/" in f"/{p.relative_to(folder)}"
    }


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    row_shape=st.sampled_from(list(ROW_SHAPES)),
    dtype=st.sampled_from(["float32", "float16", "float64", "int64"]),
    chunk_steps=st.integers(1, 5),
    chunk_bytes=st.sampled_from([8, 24, 2**20]),
    batches=st.lists(st.integers(1, 7), min_size=1, max_size=6),
    flush_after=st.sets(st.integers(0, 5), max_size=3),
    blank=st.sets(st.integers(0, 5), max_size=3),
)
def test_chunk_files_are_the_files_zarr_writes(
    row_shape, dtype, chunk_steps, chunk_bytes, batches, flush_after, blank
):
    """Whole and partial chunk rows, padded edge chunks, merges into a chunk row, chunks of
    nothing but the fill value (zarr stores none): the bytes on disk equal zarr's own, file for
    file, and zarr reads back exactly what was written."""
    original = writer.CHUNK_BYTES
    writer.CHUNK_BYTES = chunk_bytes  # small: several column chunks, the last one padded
    try:
        with tempfile.TemporaryDirectory() as folder:
            direct, through_zarr = Path(folder, "direct.zarr"), Path(folder, "zarr.zarr")
            expected = _record(direct, row_shape, dtype, chunk_steps, batches, flush_after, blank)
            opened = ChunkFiles.open
            ChunkFiles.open = classmethod(lambda cls, directory: None)
            try:
                _record(through_zarr, row_shape, dtype, chunk_steps, batches, flush_after, blank)
            finally:
                ChunkFiles.open = opened
            assert _chunk_files(direct) == _chunk_files(through_zarr)
            value = zarr.open_array(direct / "runs" / "r" / "s" / "value", mode="r")
            assert value.chunks[0] == chunk_steps
            np.testing.assert_array_equal(value[:], expected)
            step = zarr.open_array(direct / "runs" / "r" / "s" / "step", mode="r")
            np.testing.assert_array_equal(step[:], np.arange(sum(batches)))
    finally:
        writer.CHUNK_BYTES = original


def test_a_short_write_is_completed(tmp_path, monkeypatch):
    """``writev`` may write fewer bytes than asked; the rest follows, piece boundaries or not."""
    real = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, pieces: real(fd, [bytes(pieces[0])[:5]]))
    expected = _record(tmp_path / "s.zarr", (7,), "float32", 3, [4, 3, 2], {0})
    value = zarr.open_array(tmp_path / "s.zarr" / "runs" / "r" / "s" / "value", mode="r")
    np.testing.assert_array_equal(value[:], expected)


def test_a_failed_chunk_write_leaves_no_partial_file(tmp_path, tiny_model, monkeypatch):
    url = tmp_path / "s.zarr"
    model = tiny_model()
    row = sum(p.numel() for p in model.parameters()) * 4
    real, failing = os.writev, []

    def writev(fd, pieces):
        if failing:
            raise OSError(28, "No space left on device")
        return real(fd, pieces)

    monkeypatch.setattr(os, "writev", writev)
    with pytest.raises(WriteFailedError, match="No space left on device"):
        with koopkit.Recorder(url, "r", model, max_inflight_bytes=4 * row) as rec:  # 2 rows a chunk
            for _ in range(5):
                rec.step()
            deadline = time.monotonic() + 30
            while koopkit.open_store(url).run("r").committed("params") < 6:
                assert time.monotonic() < deadline, "the writer did not commit in time"
                time.sleep(0.01)
            failing.append(True)
            for _ in range(6):
                rec.step()
    monkeypatch.undo()
    assert not [p for p in url.rglob("*") if p.name.endswith(".partial")]
    store = koopkit.open_store(url)
    assert store.steps("r").tolist() == list(range(6))
    assert store.run("r").status == "interrupted"
    assert validate_store(url)[0] == []


def test_compressed_and_missing_arrays_are_left_to_zarr(tmp_path):
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    root.create_array("plain", shape=(4, 8), chunks=(2, 8), dtype="float32", compressors=None)
    root.create_array(
        "packed",
        shape=(4, 8),
        chunks=(2, 8),
        dtype="float32",
        compressors=zarr.codecs.ZstdCodec(level=1),
    )
    assert ChunkFiles.open(tmp_path / "g.zarr" / "plain").chunks == (2, 8)
    assert ChunkFiles.open(tmp_path / "g.zarr" / "packed") is None
    assert ChunkFiles.open(tmp_path / "g.zarr" / "absent") is None


def test_recorder_writes_local_chunks_without_zarr(tmp_path, tiny_model, monkeypatch):
    """On a local store the recorder's rows reach disk through the chunk files alone."""
    monkeypatch.setattr(zarr.Array, "__setitem__", _refuse)
    model = tiny_model()
    with koopkit.Recorder(tmp_path / "s.zarr", "r", model, grads=True) as rec:
        for _ in range(3):
            model(torch.randn(2, 3)).sum().backward()
            rec.step(loss=1.0)
    store = koopkit.open_store(tmp_path / "s.zarr")
    assert store.steps("r").tolist() == [0, 1, 2, 3]
    assert ChunkFiles.open(tmp_path / "s.zarr" / "runs" / "r" / "params" / "value")


def _refuse(*args, **kwargs):
    raise AssertionError("a row went through zarr")


def _stored(url, values, chunk_steps):
    run = RunWriter(url, "r")
    run.add_series(
        SeriesSpec("params", values.shape[1:], chunk_steps=chunk_steps, row_dims=("param",))
    )
    run.append("params", np.arange(len(values)), values)
    run.close()
    return koopkit.open_store(url).trajectory("r", "params")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.integers(1, 12),
    features=st.integers(1, 40),
    chunk_steps=st.integers(1, 5),
    chunk_bytes=st.sampled_from([8, 40, 2**20]),
    data=st.data(),
)
def test_reading_chunk_files_equals_reading_through_zarr(
    steps, features, chunk_steps, chunk_bytes, data
):
    values = np.random.default_rng(steps).standard_normal((steps, features), dtype=np.float32)
    original = writer.CHUNK_BYTES
    writer.CHUNK_BYTES = chunk_bytes
    try:
        with tempfile.TemporaryDirectory() as folder:
            view = _stored(Path(folder, "s.zarr"), values, chunk_steps)
            assert view.files is not None
            for _ in range(5):
                r0, r1 = sorted(data.draw(st.lists(st.integers(0, steps), min_size=2, max_size=2)))
                c0, c1 = sorted(
                    data.draw(st.lists(st.integers(0, features), min_size=2, max_size=2))
                )
                got = view[r0:r1, c0:c1]
                np.testing.assert_array_equal(got, values[r0:r1, c0:c1])
                np.testing.assert_array_equal(got, view.array[r0:r1, c0:c1])
                assert got.dtype == np.float32 and got.shape == (r1 - r0, c1 - c0)
    finally:
        writer.CHUNK_BYTES = original


def test_a_missing_chunk_reads_as_the_fill_value_and_a_short_one_fails(tmp_path):
    values = np.ones((4, 6), dtype=np.float32)
    original = writer.CHUNK_BYTES
    writer.CHUNK_BYTES = 16  # chunks of 2 x 2
    try:
        view = _stored(tmp_path / "s.zarr", values, 2)
    finally:
        writer.CHUNK_BYTES = original
    chunk = tmp_path / "s.zarr" / "runs" / "r" / "params" / "value" / "c" / "1" / "2"
    chunk.unlink()
    expected = values.copy()
    expected[2:4, 4:6] = np.nan
    np.testing.assert_array_equal(view[:, :], expected)
    np.testing.assert_array_equal(view.array[:, :], expected)  # as zarr reads it
    chunk.write_bytes(b"\0" * 15)
    with pytest.raises(StoreError, match="does not hold 16 bytes"):
        view[:, :]


def test_resuming_removes_what_a_killed_write_left(tmp_path):
    url = tmp_path / "s.zarr"
    _record(url, (7,), "float32", 2, [3], set())
    chunks = url / "runs" / "r" / "s" / "value" / "c" / "0"
    left = chunks / f"0.{'ab' * 16}.partial"
    kept = chunks / "notes.txt"
    left.write_bytes(b"torn")
    kept.write_bytes(b"not a temporary file")
    run = RunWriter(url, "r")
    run.add_series(SeriesSpec("s", (7,), chunk_steps=2, row_dims=("param",)))
    run.close()
    assert not left.exists() and kept.exists()


def test_rows_are_in_their_files_before_a_plain_reader_sees_the_array_grow(tmp_path, monkeypatch):
    """A plain zarr reader of a live run sees each array grow only once its rows are on disk,
    so never the fill value in their place."""
    url = tmp_path / "s.zarr"
    run = RunWriter(url, "r")
    run.add_series(SeriesSpec("params", (3,), chunk_steps=2, row_dims=("param",)))
    seen = []
    append = ChunkFiles.append

    def spying(self, start, rows):
        array = zarr.open_array(self.directory, mode="r")
        seen.append((os.path.basename(self.directory), start, array.shape[0]))
        append(self, start, rows)

    monkeypatch.setattr(ChunkFiles, "append", spying)
    rows = np.arange(15, dtype=np.float32).reshape(5, 3)
    run.append("params", np.arange(5), rows)
    run.close()
    assert seen == [(name, start, start) for start in (0, 2, 4) for name in ("value", "step")]
    params = zarr.open_array(url / "runs/r/params/value", mode="r")
    np.testing.assert_array_equal(params[:], rows)
