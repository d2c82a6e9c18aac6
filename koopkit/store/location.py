"""Turning a STORE argument (directory, ``.zip``, or fsspec URL) into an open Zarr root group.

A local directory opened for reading can also be opened as ``LocalNodes``: its JSON metadata
documents read without zarr, refused in exactly the same words when it is not a store.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from urllib.parse import unquote

from ..errors import (
    FormatVersionError,
    KoopkitError,
    NotAStoreError,
    StoreError,
    WriteFailedError,
)
from . import layout
from .nodes import LocalNodes


def file_url_path(text: str) -> str:
    """A ``file://`` URL as the path it names, its percent-escapes decoded; else ``text``.

    By hand rather than ``urlsplit``: a ``#`` or ``?`` in a path is part of its name here.
    """
    if not text.startswith("file://"):
        return text
    path = text[len("file://") :]
    if path.startswith("localhost/"):
        path = path[len("localhost") :]
    return unquote(path)


def local_path(url) -> Path | None:
    """The directory behind a local store, or None for URLs and zips."""
    text = file_url_path(os.fspath(url))
    if "://" in text or text.endswith(".zip"):
        return None
    return Path(text).absolute()  # a training script may chdir after opening the store


def _existing_directory(url, path: Path) -> Path:
    if not path.is_dir():
        raise NotAStoreError(f"No koopkit store at {os.fspath(url)!r}: not a directory.")
    return path


def check_writable(url, remedy: str) -> None:
    """Refuse, before any work, a store that saving into would fail on at the end: a zip
    file, or a local directory this process may not write. ``remedy`` ends the message."""
    text = os.fspath(url)
    if text.endswith(".zip"):
        raise StoreError(
            f"Store {text!r} is a zip file, which koopkit reads but does not write; {remedy}."
        )
    path = local_path(text)
    if path is not None and path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise StoreError(f"Store {text!r} is not writable (permission denied); {remedy}.")


def _zarr_store(url, *, writable: bool):
    import zarr.storage

    text = file_url_path(os.fspath(url))
    if text.endswith(".zip"):
        if writable:
            check_writable(text, "record into a directory and zip it afterwards")
        if not Path(text).is_file():
            raise NotAStoreError(f"No koopkit store at {text!r}: the file does not exist.")
        return zarr.storage.ZipStore(text, mode="r")
    path = local_path(text)
    if path is None:
        try:
            return zarr.storage.FsspecStore.from_url(text, read_only=not writable)
        except (ValueError, ImportError) as exc:  # an unknown protocol, or its package missing
            raise NotAStoreError(f"Cannot open {text!r}: {exc}") from exc
    if not writable:
        _existing_directory(text, path)
    if writable and path.exists():
        if not path.is_dir():
            raise NotAStoreError(f"{text!r} exists and is not a directory, so not a koopkit store.")
        if any(path.iterdir()) and not (path / "zarr.json").is_file():
            raise NotAStoreError(
                f"{text!r} is a non-empty directory but not a Zarr store; refusing to write into it."
            )
    return zarr.storage.LocalStore(path, read_only=not writable)


def check_root(attrs, url) -> None:
    """Refuse groups that are not koopkit stores, or are from a format we cannot read."""
    block = attrs.get(layout.NAMESPACE) if isinstance(attrs, dict) else None
    if not isinstance(block, dict) or block.get("format") != layout.FORMAT_NAME:
        raise NotAStoreError(
            f"{os.fspath(url)!r} is a Zarr group but not a koopkit trajectory store "
            "(its attributes have no koopkit.format)."
        )
    version = str(block.get("version", ""))
    if version.split(".")[0] != str(layout.SUPPORTED_MAJOR):
        raise FormatVersionError(
            f"Store {os.fspath(url)!r} has format version {version!r}; "
            f"this koopkit reads {layout.SUPPORTED_MAJOR}.x. Upgrade koopkit to read it."
        )


def open_root(url, *, writable: bool = False):
    """The root group of a koopkit store; created (empty) when writable and absent.

    Two processes may create one store at once, and zarr's check-then-create is not atomic:
    the one that loses the race finds the other's root document (or reads it half-written)
    and opens it on a later try.
    """
    if not writable:
        return _open_root(url, writable)
    try:
        for wait in (0.01, 0.03, 0.1, 0.3):
            try:
                return _drop_snapshot(_open_root(url, writable, racing=True), url)
            except ValueError:  # zarr's ContainsGroupError, or a root document being written
                time.sleep(wait)
        return _drop_snapshot(_open_root(url, writable), url)
    except OSError as exc:
        if isinstance(exc, KoopkitError):
            raise
        raise WriteFailedError(
            f"Cannot write into store {os.fspath(url)!r}: {type(exc).__name__}: {exc}"
        ) from exc


def _drop_snapshot(group, url):
    """Remove a local store's consolidated metadata before writing into it: the snapshot
    would go stale with the first row, and plain zarr and xarray readers trust it."""
    path = local_path(url)
    try:
        document = json.loads((path / "zarr.json").read_bytes()) if path else {}
    except (OSError, ValueError):
        return group
    if document.get("consolidated_metadata") is not None:
        group.attrs.update(group.attrs.asdict())  # rewrites the root document without it
    return group


def _open_root(url, writable: bool, racing: bool = False):
    """The root group, its nodes always read from their own documents: consolidated metadata
    (``zarr.consolidate_metadata``, xarray's ``to_zarr``) is a snapshot no writer here updates,
    and through it a reader would miss committed rows and a resumed writer overwrite them."""
    import zarr

    store = _zarr_store(url, writable=writable)
    try:
        group = zarr.open_group(
            store,
            mode="r" if not writable else "a",
            zarr_format=3,
            use_consolidated=False,
            attributes=layout.root_attrs() if writable else None,  # a new root, in one write
        )
    except (FileNotFoundError, KeyError) as exc:
        raise NotAStoreError(f"No koopkit store at {os.fspath(url)!r}.") from exc
    except StoreError:
        raise
    except Exception as exc:  # zarr raises many types for unreadable input
        if racing and isinstance(exc, ValueError):
            raise
        if writable and isinstance(exc, OSError):  # a refused write: disk full, read-only
            raise
        raise NotAStoreError(
            f"{os.fspath(url)!r} is not a readable Zarr v3 store: {type(exc).__name__}: {exc}"
        ) from exc
    attrs = group.attrs.asdict()
    if writable and not attrs and not list(group.keys()):
        group.attrs.update(layout.root_attrs())
        return group
    check_root(attrs, url)
    return group


def open_local_nodes(url) -> LocalNodes | None:
    """The nodes of a local directory store from its ``zarr.json`` documents, without zarr.

    None for a zip or a URL. Refuses what ``open_root`` refuses, with the same errors; raises
    ``NotCanonical`` where only zarr can say what the root document means.
    """
    path = local_path(url)
    if path is None:
        return None
    nodes = LocalNodes(_existing_directory(url, path), lambda: open_root(url))
    check_root(nodes.attrs(""), url)
    return nodes
