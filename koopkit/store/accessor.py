"""``run.koopkit``: per-tensor views of the flattened parameters of an opened run."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import RunNotFoundError


@xr.register_datatree_accessor("koopkit")
class RunAccessor:
    """Views of a run opened with :func:`koopkit.open_run`."""

    def __init__(self, tree: xr.DataTree):
        self._tree = tree

    def tensors(self, series: str = "params") -> list[dict]:
        """The tensors table: name, offset, shape and dtype of each flattened tensor.

        A sketch series has no per-tensor columns (each column mixes every tensor), so
        asking for its table raises ``ValueError``; its source tensors stay readable in
        ``run[series].attrs["tensors"]``.
        """
        attrs = self._tree[series].attrs
        if attrs.get("kind") == "sketch":
            sketch = attrs.get("sketch") or {}
            raise ValueError(
                f"Series {series!r} holds a {sketch.get('method', 'random')} sketch of width "
                f"{sketch.get('dim', '?')}, not the flattened tensors; per-tensor views need "
                "a series of kind 'full' or 'subset' (record without sketch=)."
            )
        return list(attrs.get("tensors") or [])

    def tensor(self, name: str, series: str = "params") -> xr.DataArray:
        """One tensor's trajectory, lazily reshaped to ``(step, *shape)``."""
        for entry in self.tensors(series):
            if entry["name"] == name:
                break
        else:
            known = ", ".join(e["name"] for e in self.tensors(series)) or "none"
            raise RunNotFoundError(f"No tensor {name!r} in {series!r}; tensors: {known}.")
        value = self._tree[series]["value"]
        size = int(np.prod(entry["shape"], dtype=np.int64))
        flat = value.data[:, entry["offset"] : entry["offset"] + size]
        data = flat.reshape((flat.shape[0], *entry["shape"]))
        dims = ("step", *(f"{name}_dim{i}" for i in range(len(entry["shape"]))))
        return xr.DataArray(data, dims=dims, coords={"step": value["step"]}, name=name)
