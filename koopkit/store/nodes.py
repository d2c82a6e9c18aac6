"""The nodes of a store as a reader sees them: group attributes, child groups, array shapes, rows.

``TrajectoryStore`` reads metadata only through this small interface, so every meaning given
to the attributes lives in one place whatever serves them:

- ``ZarrNodes`` serves any store zarr opens (directory, zip, memory, fsspec URL);
- ``LocalNodes`` serves a local directory from its ``zarr.json`` documents with plain ``os``
  and ``json``, so ``koopkit info`` answers without importing zarr or numpy.

``LocalNodes`` answers only for documents in the exact form zarr writes them (the form
koopkit's writer produces). For anything else (a document zarr may read differently or
refuse, a stray file zarr would warn about, compressed steps) it raises ``NotCanonical``,
and the caller reads the store through zarr instead, so the answer never differs.
"""

from __future__ import annotations

import itertools
import json
import math
import operator
import os
import struct
from typing import NamedTuple

from ..errors import StoreError

__all__ = [
    "ArrayDocument",
    "ArrayMeta",
    "LocalNodes",
    "NotCanonical",
    "ZarrNodes",
    "parse_array",
    "unreadable_chunk",
]

ZARR_JSON = "zarr.json"
MAX_CHUNK_ROWS = 2**24  # step chunks read here; larger ones (koopkit writes 1024) go to zarr


class NotCanonical(Exception):
    """A local store holds something ``LocalNodes`` does not vouch for: read it with zarr."""


class ArrayMeta(NamedTuple):
    shape: tuple[int, ...]
    dtype: str  # numpy's name for it, as ``str(array.dtype)`` gives


class ZarrNodes:
    """Nodes of a store opened by zarr; paths are relative to the root group (``""`` is the root).

    A node whose ``zarr.json`` zarr cannot read is a ``StoreError`` naming that document
    (``url`` prefixes it), not the parser's bare exception.
    """

    def __init__(self, root, url=None):
        self.root = root
        self.url = None if url is None else os.fspath(url)

    def node(self, path: str):
        """The zarr group or array at ``path``; KeyError when there is none."""
        if not path:
            return self.root
        try:
            return self.root[path]
        except KeyError:
            raise
        except Exception as exc:
            raise self.unreadable(path, exc) from exc

    def unreadable(self, path: str, exc: BaseException) -> StoreError:
        """The error for a node whose metadata document cannot be read or parsed."""
        document = f"{path}/{ZARR_JSON}" if path else ZARR_JSON
        if self.url is not None:
            document = f"{self.url.rstrip('/')}/{document}"
        if isinstance(exc, json.JSONDecodeError):
            return StoreError(
                f"{document!r} is not valid JSON (line {exc.lineno} column {exc.colno}); "
                "repair or remove that node."
            )
        if isinstance(exc, OSError) and exc.strerror:
            return StoreError(f"Cannot read {document!r}: {exc.strerror}.")
        return StoreError(
            f"{document!r} is not valid Zarr metadata: {type(exc).__name__}: {exc}".rstrip(": ")
        )

    def attrs(self, path: str) -> dict:
        return self.node(path).attrs.asdict()

    def contains(self, path: str) -> bool:
        try:
            return path in self.root
        except Exception as exc:
            raise self.unreadable(path, exc) from exc

    def groups(self, path: str) -> list[tuple[str, dict]]:
        """The child groups of a group, sorted by name, with their attributes."""
        group = self.node(path)
        try:
            children = [(name, child.attrs.asdict()) for name, child in group.groups()]
        except Exception as exc:
            raise self._unreadable_child(group, path, exc) from exc
        return sorted(children, key=lambda item: item[0])

    def _unreadable_child(self, group, path: str, exc: BaseException) -> StoreError:
        """Which child of ``group`` made listing it fail, read one by one; zarr's listing
        left its other reads running, and they are let finish so none is torn down pending."""
        import asyncio

        from zarr.core.sync import sync

        async def probe():
            current = asyncio.current_task()
            others = [t for t in asyncio.all_tasks() if t is not current]
            if others:  # the listing's reads still in flight: wait, and read their outcome
                await asyncio.wait(others, timeout=30)
                for task in others:
                    if task.done() and not task.cancelled():
                        task.exception()
            agroup = group._async_group
            names = sorted(
                [key async for key in agroup.store.list_dir(agroup.path) if key != ZARR_JSON]
            )
            outcomes = await asyncio.gather(
                *(agroup.getitem(name) for name in names), return_exceptions=True
            )
            return list(zip(names, outcomes, strict=True))

        try:
            outcomes = sync(probe())
        except Exception:  # the store cannot even be listed: say what listing said
            outcomes = []
        for name, outcome in outcomes:
            if isinstance(outcome, Exception) and not isinstance(outcome, KeyError):
                return self.unreadable(f"{path}/{name}" if path else name, outcome)
        where = path or "the root group"
        return StoreError(f"Cannot list the children of {where!r}: {type(exc).__name__}: {exc}")

    def array(self, path: str) -> ArrayMeta:
        array = self.node(path)
        return ArrayMeta(tuple(array.shape), str(array.dtype))

    def rows(self, path: str, stop: int):
        """The first ``stop`` rows of an array (fewer when it is shorter), as a numpy array."""
        import numpy as np

        array = self.node(path)
        key = slice(0, min(stop, array.shape[0]))
        try:
            return np.asarray(array[key])
        except Exception as exc:  # a chunk that does not decode is the store's fault
            where = path if self.url is None else f"{path} in {self.url!r}"
            raise unreadable_chunk(array, key, where, exc) from exc


def unreadable_chunk(array, key, where: str, exc: BaseException) -> StoreError:
    """The error for ``array[key]`` failing in zarr: names the first stored chunk of the
    selection that fails when read alone (zarr's own message names no chunk)."""
    chunk = next(
        (name for name, region in _stored_chunks(array, key) if _fails(array, region)), None
    )
    what = where if chunk is None else f"chunk {chunk!r} of {where}"
    return StoreError(f"Cannot read {what}: {type(exc).__name__}: {exc}")


def _fails(array, region) -> bool:
    try:
        array[region]
    except Exception:
        return True
    return False


def _stored_chunks(array, key):
    """(key, region) of each stored chunk (a shard, when sharded) that ``key`` touches, for keys
    of ints and slices; nothing for other keys."""
    try:
        grid = tuple(array.metadata.chunk_grid.chunk_shape)
    except Exception:  # a chunk grid that is not regular
        return
    key = key if isinstance(key, tuple) else (key,)
    spans = []
    for index, length, size in itertools.zip_longest(key, array.shape, grid):
        if index is None or length is None:  # axes past the key are read whole
            index = slice(None)
        if isinstance(index, slice):
            start, stop, step = index.indices(length or 0)
            if step < 0 or start >= stop:
                return
            last = start + (stop - 1 - start) // step * step
        else:
            try:
                start = last = operator.index(index) % length
            except (TypeError, ZeroDivisionError):  # a list of indices, or an empty axis
                return
        spans.append(range(start // size, last // size + 1))
    for coords in itertools.product(*spans):
        region = tuple(
            slice(c * size, min((c + 1) * size, length))
            for c, size, length in zip(coords, grid, array.shape, strict=True)
        )
        yield array.metadata.encode_chunk_key(coords), region


# ------------------------------------------------------------------------------------------
# the documents LocalNodes vouches for: what zarr 3 writes for koopkit's groups and arrays

_INTS = {"int8": "b", "int16": "h", "int32": "i", "int64": "q"}
_INTS |= {f"u{name}": code.upper() for name, code in _INTS.items()}
_ITEMSIZE = {"bool": 1, "float16": 2, "float32": 4, "float64": 8}
_ITEMSIZE |= {name: struct.calcsize(code) for name, code in _INTS.items()}
_GROUP_KEYS = {"zarr_format", "node_type", "attributes", "consolidated_metadata"}
_ARRAY_KEYS = {
    "zarr_format", "node_type", "shape", "data_type", "chunk_grid", "chunk_key_encoding",
    "fill_value", "codecs", "attributes", "dimension_names", "storage_transformers",
}  # fmt: skip
_ARRAY_REQUIRED = _ARRAY_KEYS - {"attributes", "dimension_names", "storage_transformers"}
_KEY_ENCODING = {"name": "default", "configuration": {"separator": "/"}}
_BLOSC_CNAMES = {"lz4", "lz4hc", "blosclz", "zstd", "zlib"}
_BLOSC_SHUFFLES = {"noshuffle", "shuffle", "bitshuffle"}


def _is_int(value, low=0, high=math.inf) -> bool:
    return type(value) is int and low <= value <= high


def _is_config(codec, name, keys) -> bool:
    return (
        isinstance(codec, dict)
        and codec.keys() == {"name", "configuration"}
        and codec["name"] == name
        and isinstance(codec["configuration"], dict)
        and codec["configuration"].keys() == keys
    )


def _is_compressor(codec) -> bool:
    if _is_config(codec, "zstd", {"level", "checksum"}):
        conf = codec["configuration"]
        return _is_int(conf["level"], 0, 22) and type(conf["checksum"]) is bool
    if _is_config(codec, "gzip", {"level"}):
        return _is_int(codec["configuration"]["level"], 0, 9)
    if _is_config(codec, "blosc", {"typesize", "cname", "clevel", "shuffle", "blocksize"}):
        conf = codec["configuration"]
        return (
            _is_int(conf["typesize"], 1)
            and isinstance(conf["cname"], str)
            and conf["cname"] in _BLOSC_CNAMES
            and _is_int(conf["clevel"], 0, 9)
            and isinstance(conf["shuffle"], str)
            and conf["shuffle"] in _BLOSC_SHUFFLES
            and _is_int(conf["blocksize"])
        )
    return False


def _is_fill(value, dtype: str) -> bool:
    if dtype == "bool":
        return type(value) is bool
    if dtype in _INTS:
        bits = 8 * _ITEMSIZE[dtype]
        if dtype.startswith("u"):
            return _is_int(value, 0, 2**bits - 1)
        return _is_int(value, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if value in ("NaN", "Infinity", "-Infinity"):
        return True
    return type(value) in (int, float) and abs(value) <= 65504  # finite in every float type


class ArrayDocument(NamedTuple):
    meta: ArrayMeta
    chunks: tuple[int, ...]
    fill: object
    raw: bool  # chunks are the plain little-endian bytes, no compressor


def _group_attrs(doc: dict) -> dict:
    if not (
        doc.keys() <= _GROUP_KEYS
        and type(doc.get("zarr_format")) is int
        and doc["zarr_format"] == 3
        and doc.get("consolidated_metadata") is None
    ):
        raise NotCanonical
    attrs = doc.get("attributes")
    if attrs is None:
        return {}
    if not isinstance(attrs, dict):
        raise NotCanonical
    return attrs


def parse_array(doc: dict) -> ArrayDocument:
    """An array's ``zarr.json`` document, if it is in the exact form zarr writes; else NotCanonical."""
    shape, dtype, codecs = doc.get("shape"), doc.get("data_type"), doc.get("codecs")
    if not (
        _ARRAY_REQUIRED <= doc.keys() <= _ARRAY_KEYS
        and type(doc["zarr_format"]) is int
        and doc["zarr_format"] == 3
        and isinstance(shape, list)
        and all(_is_int(n) for n in shape)
        and isinstance(dtype, str)
        and dtype in _ITEMSIZE
        and _is_fill(doc["fill_value"], dtype)
        and doc["chunk_key_encoding"] == _KEY_ENCODING
        and isinstance(doc.get("attributes", {}), dict)
        and doc.get("storage_transformers", []) == []
        and isinstance(codecs, list)
        and 1 <= len(codecs) <= 2
        and all(_is_compressor(codec) for codec in codecs[1:])
    ):
        raise NotCanonical
    names = doc.get("dimension_names")
    if names is not None and not (
        isinstance(names, list)
        and len(names) == len(shape)
        and all(name is None or isinstance(name, str) for name in names)
    ):
        raise NotCanonical
    grid = doc["chunk_grid"]
    if not (
        _is_config(grid, "regular", {"chunk_shape"})
        and isinstance(grid["configuration"]["chunk_shape"], list)
        and len(grid["configuration"]["chunk_shape"]) == len(shape)
        and all(_is_int(n, 1) for n in grid["configuration"]["chunk_shape"])
    ):
        raise NotCanonical
    plain = {"name": "bytes"}
    if _ITEMSIZE[dtype] > 1:
        plain["configuration"] = {"endian": "little"}
    if codecs[0] != plain:
        raise NotCanonical
    chunks = grid["configuration"]["chunk_shape"]
    return ArrayDocument(
        ArrayMeta(tuple(shape), dtype),
        tuple(chunks),
        doc["fill_value"],
        len(codecs) == 1,
    )


class LocalNodes:
    """Nodes of a local directory store, read from its ``zarr.json`` documents without zarr.

    ``root`` is the zarr root group, opened (by ``open_root``) only when something reads data.
    """

    def __init__(self, directory, open_root):
        self.directory = os.fspath(directory)
        self._open_root = open_root
        self._root = None
        self._documents: dict[str, dict | None] = {}

    @property
    def root(self):
        if self._root is None:
            self._root = self._open_root()
        return self._root

    def _path(self, path: str, *more: str) -> str:
        return os.path.join(self.directory, *(path.split("/") if path else ()), *more)

    def _document(self, path: str) -> dict | None:
        """The node's metadata document; None when it has none (not a node, to zarr)."""
        if path not in self._documents:
            try:
                with open(self._path(path, ZARR_JSON), "rb") as f:
                    data = f.read()
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                self._documents[path] = None
                return None
            except OSError:
                raise NotCanonical from None
            try:
                doc = json.loads(data)  # as zarr parses it: bytes, any UTF encoding, NaN allowed
            except Exception:  # invalid, or nested too deep: zarr says how it fails
                raise NotCanonical from None
            if not isinstance(doc, dict) or doc.get("node_type") not in ("group", "array"):
                raise NotCanonical
            self._documents[path] = doc
        return self._documents[path]

    def _group(self, path: str) -> dict:
        doc = self._document(path)
        if doc is None or doc["node_type"] != "group":
            raise NotCanonical
        return _group_attrs(doc)

    def _array(self, path: str) -> ArrayDocument:
        doc = self._document(path)
        if doc is None or doc["node_type"] != "array":
            raise NotCanonical
        return parse_array(doc)

    def attrs(self, path: str) -> dict:
        return self._group(path)

    def contains(self, path: str) -> bool:
        doc = self._document(path)
        if doc is None:
            return False
        if doc["node_type"] == "group":  # zarr parses the document too
            _group_attrs(doc)
        else:
            parse_array(doc)
        return True

    def groups(self, path: str) -> list[tuple[str, dict]]:
        """The child groups of a group, sorted by name, with their attributes."""
        self._group(path)
        try:
            names = os.listdir(self._path(path))
        except OSError:
            raise NotCanonical from None
        children = []
        for name in names:
            if name == ZARR_JSON:
                continue
            if "\\" in name:  # zarr reads a backslash as a path separator
                raise NotCanonical
            child = f"{path}/{name}" if path else name
            doc = self._document(child)
            if doc is None:  # zarr warns about what is not a node
                raise NotCanonical
            if doc["node_type"] == "group":
                children.append((name, _group_attrs(doc)))
            else:
                parse_array(doc)
        return sorted(children, key=lambda item: item[0])

    def array(self, path: str) -> ArrayMeta:
        return self._array(path).meta

    def rows(self, path: str, stop: int) -> tuple[int, ...]:
        """The first ``stop`` rows of a one-dimensional, uncompressed integer array."""
        array = self._array(path)
        chunk_rows = array.chunks[0] if array.chunks else 1
        if not (
            len(array.meta.shape) == 1
            and array.meta.dtype in _INTS
            and array.raw
            and chunk_rows <= MAX_CHUNK_ROWS
        ):
            raise NotCanonical
        count = min(stop, array.meta.shape[0])
        code = _INTS[array.meta.dtype]
        chunk = f"<{chunk_rows}{code}"
        size = struct.calcsize(chunk)
        values: list[int] = []
        for start in range(0, count, chunk_rows):  # every chunk zarr would read
            try:
                with open(self._path(path, "c", str(start // chunk_rows)), "rb") as f:
                    data = f.read(size + 1) if os.fstat(f.fileno()).st_size == size else b""
                if len(data) != size:
                    raise NotCanonical  # zarr cannot decode it either; it says how
                values.extend(struct.unpack(chunk, data))
            except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
                # never written (all fill value), as zarr reads a missing chunk
                values.extend([array.fill] * min(chunk_rows, count - start))
            except OSError:
                raise NotCanonical from None
        return tuple(values[:count])
