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
        """The tensors table: name, offset, shape and dtype of each flattened tensor."""
        return list(self._tree[series].attrs.get("tensors") or [])

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
