"""Exact DMD estimators: plain, delay-embedded (Hankel), and PCA then delays.

Each reduces the trajectories to T x T objects (see :mod:`koopkit_dmd.exact`), chosen by
``method``:

- ``"svd"``: the snapshots themselves as a factor, for few features (``features <= snapshots``);
- ``"gram"``: the method of snapshots, one streamed SYRK/GEMM pass to the T x T Gram;
- ``"qr"``: a streamed shifted-CholeskyQR3 factor (two more passes; TSQR when the snapshots
  are linearly dependent), as accurate as a direct SVD;
- ``"auto"``: ``"svd"`` for few features, else ``"gram"``, switching to ``"qr"`` when a kept
  singular value is too small for the Gram to give its eigenvalues to 1e-8 (about 1.5e-4 of
  the largest; :func:`koopkit.linalg.gram_accuracy_lost`).

No rank rule keeps a singular value at or below the data's rounding noise (about ten times
the spectral norm of the rounding errors of data of its precision;
:func:`koopkit.linalg.rounding_noise`), and ``"gram"`` none below what the Gram resolves; an
int rank that would is refused.
"""

from __future__ import annotations

import functools
import inspect
from numbers import Integral

import numpy as np

from koopkit.errors import EstimationError, InsufficientDataError
from koopkit.linalg import (
    DEFAULT_BLOCK_BYTES,
    GRAM_RELATIVE_ACCURACY,
    Trajectories,
    center_factor,
    center_gram,
    check_rank_rule,
    cholesky_qr,
    delay_window_starts,
    embedded_lengths,
    gram_accuracy_lost,
    gram_factor,
    gram_noise,
    hankel_factor,
    hankel_gram,
    rounding_noise,
    streamed_gram,
    streamed_product,
    tsqr,
)
from koopkit.results import Spectrum

from .exact import ExactDMD, exact_dmd, exact_dmd_from_gram, fix_mode_phases, snapshot_pairs

__all__ = ["DMD", "HankelDMD", "PCAHankelDMD"]


class _Estimator:
    """Parameter checks, provenance and the factor of the raw snapshots, shared by the estimators."""

    name: str
    METHODS = ("auto", "gram", "qr", "svd")

    def _set_options(self, rank, center, residuals, amplitudes, modes, device, block_bytes, method):
        check_rank_rule(rank)
        for option, value in [
            ("center", center),
            ("residuals", residuals),
            ("amplitudes", amplitudes),
            ("modes", modes),
        ]:
            if not isinstance(value, bool | np.bool_):
                raise EstimationError(
                    f"Expected {option} to be True or False. Got {value!r} instead."
                )
        _check_int("block_bytes", block_bytes, minimum=1)
        if device is not None:
            _check_device(device)
        if method not in self.METHODS:
            choices = ", ".join(repr(m) for m in self.METHODS)
            raise EstimationError(
                f"Expected method to be one of {choices}. Got {method!r} instead."
            )
        self.rank = rank.item() if isinstance(rank, np.generic) else rank  # plain JSON
        self.center = bool(center)
        self.residuals = bool(residuals)
        self.amplitudes = bool(amplitudes)
        self.modes = bool(modes)
        self.device = device
        self.block_bytes = block_bytes
        self.method = method

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's parameters, by name (``deep`` as scikit-learn's: no nested
        estimators here)."""
        names = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    def set_params(self, **params):
        """Change parameters, checked as the constructor checks them; returns the estimator."""
        unknown = sorted(params.keys() - self.get_params().keys())
        if unknown:
            raise EstimationError(
                f"Invalid parameters {unknown} for {type(self).__name__}; expected some of "
                f"{', '.join(self.get_params())}."
            )
        self.__init__(**{**self.get_params(), **params})
        return self

    def __repr__(self) -> str:
        params = ", ".join(f"{name}={value!r}" for name, value in self.get_params().items())
        return f"{type(self).__name__}({params})"

    def _first_method(self, features: int, snapshots: int) -> str:
        """The small side: factor in feature space when the (embedded) features are fewer."""
        if self.method != "auto":
            return self.method
        return "svd" if features <= snapshots else "gram"

    def _raw_factor(self, trajectories: Trajectories, method: str, get_gram) -> np.ndarray:
        """Factor ``F`` of the uncentered snapshots, ``Z^T = Q F``, by ``"svd"`` or ``"qr"``."""
        if method == "svd":
            return trajectories.stacked(block_bytes=self.block_bytes).T
        if trajectories.features < trajectories.steps:  # Z^T is wide: no CholeskyQR exists
            return tsqr(trajectories, device=self.device, block_bytes=self.block_bytes)
        return cholesky_qr(
            trajectories, get_gram(), device=self.device, block_bytes=self.block_bytes
        )

    def _gram_getter(self, trajectories: Trajectories):
        """The Gram, streamed on first use only: ``"svd"`` never needs it, ``"qr"`` reuses it."""

        @functools.cache
        def get_gram():
            gram = streamed_gram(trajectories, device=self.device, block_bytes=self.block_bytes)
            _check_gram_range(gram, trajectories, self.block_bytes)
            return gram

        return get_gram

    def _estimate(self, method: str, estimate, get_gram):
        """``(method, estimate(method))``; ``"auto"`` moves from the Gram to ``"qr"`` when the
        Gram does not resolve the smallest kept singular value, or too few of them.

        ``estimate(method)`` returns ``(ExactDMD, extra)``, or ``(None, None)`` when the Gram
        already failed before the DMD (the PCA's last component).
        """
        if method != "gram" or self.method != "auto":
            return method, estimate(method)
        scale = self._gram_scale(get_gram())  # its own errors (NaN, range) are final
        try:
            result = estimate(method)
            dmd = result[0]
            if dmd is not None and not gram_accuracy_lost(dmd.singular_values, scale):
                return method, result
        except EstimationError as exc:
            if type(exc) is not EstimationError:  # not a rank refusal: no factor changes it
                raise
        return "qr", estimate("qr")

    def _rounding_noise(self, trajectories: Trajectories, norm: float) -> float:
        """Rounding noise of the (delay-embedded) snapshots of uncentered Frobenius norm
        ``norm``: centering removes the scale, not the rounding of the stored values."""
        embedded = np.sqrt(self.delays + 1) * norm  # a snapshot is in up to delays + 1 windows
        shape = (trajectories.features, trajectories.steps)
        return rounding_noise(trajectories.rounding_unit, embedded, shape)

    def _gram_scale(self, gram: np.ndarray) -> float:
        """Bound on the largest eigenvalue of the (delay-embedded) Gram."""
        return (self.delays + 1) * _frobenius(gram)

    def _meta(self, trajectories: Trajectories, method: str, dmd: ExactDMD) -> dict:
        params = self.get_params()
        if params["device"] is not None:
            params["device"] = str(params["device"])
        return {
            "estimator": self.name,
            "params": params,
            "rank": int(dmd.eigenvalues.size),
            "method": method,
            "trajectories": len(trajectories.lengths),
            "snapshots": trajectories.steps,
            "features": trajectories.features,
            "singular_values": [float(s) for s in dmd.singular_values],
        }

    def _check_sizes(self, trajectories: Trajectories, delays: int, features: int) -> None:
        """Every trajectory keeps a pair after embedding; an int rank fits pairs and features."""
        with_delays = f" with {delays} delays" if delays else ""
        for i, length in enumerate(trajectories.lengths):
            if length < delays + 2:
                raise InsufficientDataError(
                    f"Expected at least {delays + 2} steps in trajectory {i}{with_delays}. "
                    f"Got {length} instead."
                )
        if not isinstance(self.rank, Integral):
            return
        count = len(trajectories.lengths)
        pairs = trajectories.steps - count * (delays + 1)
        if pairs < self.rank:
            raise InsufficientDataError(
                f"Expected at least {self.rank + count * (delays + 1)} snapshots for rank "
                f"{self.rank}{with_delays}. Got {trajectories.steps} instead."
            )
        if features < self.rank:
            raise InsufficientDataError(
                f"Expected rank at most {features}, the dimension of the snapshots"
                f"{with_delays}. Got {self.rank} instead."
            )


class DMD(_Estimator):
    """Exact DMD of one condition's trajectories, streamed over features.

    Parameters
    ----------
    rank : int, float in (0, 1), "gd" or None
        Singular values of ``X`` kept: that many, that fraction of the energy, the
        Gavish-Donoho optimal hard threshold, or all above the data's rounding noise
        (:func:`koopkit.linalg.rounding_noise`, for the precision of the data: float32 data
        are no more precise for being computed in float64).
    center : bool
        Subtract each feature's mean over all snapshots first (done on the small factor or
        Gram: no second pass).
    residuals : bool
        ResDMD residual of every eigenpair, from the same T x T quantities.
    amplitudes : bool
        Amplitude of every mode, fitted to each trajectory's first snapshot.
    modes : bool
        Exact DMD modes ``(features, r)``, computed lazily, with one more pass over the data,
        the first time ``Spectrum.get_modes()`` is called.
    device : str or torch.device, optional
        Run the passes over the data with torch on this device (``"cuda"``).
    block_bytes : int
        Memory of one block of feature columns of all trajectories, as float64.
    method : {"auto", "gram", "qr", "svd"}
        How the snapshots are factored; see :mod:`koopkit_dmd.estimators`. ``meta["method"]``
        says which one ran.

    Notes
    -----
    ``fit(trajectories)`` takes a list of ``(steps, features)`` array-likes (numpy, memmap,
    zarr, dask, torch) or one such array. Trajectories are fitted jointly: ``X`` holds all
    snapshots but each trajectory's last, ``Y`` all but each one's first, so no pair crosses
    from one trajectory into the next. Eigenvalues are equal to PyDMD's
    ``DMD(svd_rank=r, exact=True)``.

    With ``X = U S V^T`` truncated to rank r, ``A~ = U^T Y V S^{-1}``, ``A~ W = W diag(lambda)``
    and exact modes ``Y V S^{-1} W``. Residuals are ResDMD's [1]_ for the linear dictionary of the
    kept POD coordinates, ``Psi_X = V S``, ``Psi_Y = Y^T U``, ``G = Psi_X^* Psi_X``,
    ``A = Psi_X^* Psi_Y``, ``L = Psi_Y^* Psi_Y``: for ``lambda`` with a left eigenvector ``g``
    of ``A~``, ``res^2 = g^* (L - lambda A^* - conj(lambda) A + |lambda|^2 G) g / g^* G g``
    (details in :func:`koopkit_dmd.exact.exact_dmd`). Amplitudes are ``sum_i |b_i|`` over
    trajectories, ``b_i`` the least-squares fit of the modes to the first snapshot of
    trajectory ``i``.

    References
    ----------
    .. [1] M. J. Colbrook and A. Townsend, "Rigorous data-driven computation of spectral
       properties of Koopman operators for dynamical systems", Comm. Pure Appl. Math. 77(1),
       221-283, 2024.
    """

    name = "dmd"
    delays = 0

    def __init__(
        self,
        rank=None,
        *,
        center: bool = False,
        residuals: bool = True,
        amplitudes: bool = False,
        modes: bool = False,
        device=None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        method: str = "auto",
    ):
        self._set_options(rank, center, residuals, amplitudes, modes, device, block_bytes, method)

    def fit(self, trajectories) -> Spectrum:
        """Estimate the spectrum of the trajectories; the input is only read."""
        trajectories = Trajectories.from_input(trajectories)
        delays = self.delays
        features = trajectories.features * (delays + 1)
        self._check_sizes(trajectories, delays, features)
        lengths = embedded_lengths(trajectories.lengths, delays)
        get_gram = self._gram_getter(trajectories)

        method, (dmd, _) = self._estimate(
            self._first_method(features, int(sum(lengths))),
            lambda m: (self._exact_dmd(trajectories, m, get_gram, lengths, features), None),
            get_gram,
        )

        return Spectrum(
            eigenvalues=dmd.eigenvalues,
            amplitudes=dmd.amplitudes,
            residuals=dmd.residuals,
            modes=self._lazy_modes(trajectories, dmd) if self.modes else None,
            meta=self._meta(trajectories, method, dmd),
        )

    def _exact_dmd(self, trajectories, method, get_gram, lengths, features) -> ExactDMD:
        """Exact DMD of the (centered, delay-embedded) snapshots, from their Gram or a factor."""
        delays = self.delays
        options = {"residuals": self.residuals, "amplitudes": self.amplitudes}
        if method == "gram":
            gram = get_gram()
            noise = self._rounding_noise(trajectories, np.sqrt(np.trace(gram)))
            if self.method == "gram":
                noise = max(noise, gram_noise(self._gram_scale(gram), len(gram)))
            if self.center:
                gram = center_gram(gram)
            if delays:
                gram = hankel_gram(gram, trajectories.lengths, delays)
            try:
                return exact_dmd_from_gram(
                    gram, lengths, self.rank, features, noise=noise, **options
                )
            except EstimationError as exc:
                if type(exc) is EstimationError and self.method == "gram":  # a rank refused
                    exc.args = (
                        f"{exc} With method='gram' that noise is the Gram's; method='qr' "
                        "resolves singular values to the data's precision.",
                    )
                raise
        factor = self._raw_factor(trajectories, method, get_gram)
        noise = self._rounding_noise(trajectories, _frobenius(factor))
        if self.center:
            factor = center_factor(factor)
        if delays:
            factor = hankel_factor(factor, trajectories.lengths, delays)
        return exact_dmd(factor, lengths, self.rank, features, noise=noise, **options)

    def _lazy_modes(self, trajectories: Trajectories, dmd: ExactDMD) -> _LazyModes:
        """The exact modes ``Y V S^{-1} W``, with the options of this fit, computed when asked."""
        delays, rank = self.delays, dmd.eigenvalues.size
        lengths = embedded_lengths(trajectories.lengths, delays)
        _, y = snapshot_pairs(lengths)
        # Real and imaginary parts interleaved, so the real product is the complex modes.
        coefficients = np.empty((y.size, 2 * rank))
        coefficients[:, 0::2] = dmd.mode_coefficients.real
        coefficients[:, 1::2] = dmd.mode_coefficients.imag
        return _LazyModes(
            trajectories,
            delay_window_starts(trajectories.lengths, delays)[y],
            coefficients,
            delays=delays,
            center=self.center,
            device=self.device,
            block_bytes=self.block_bytes,
        )


class _LazyModes:
    """Exact DMD modes computed in one pass over the data on the first call, then kept.

    It holds the data; a Spectrum pickles its modes, never this.
    """

    def __init__(
        self, trajectories, oldest_rows, coefficients, *, delays, center, device, block_bytes
    ):
        self.trajectories = trajectories
        self.oldest_rows = oldest_rows  # the oldest snapshot in each y's delay window
        self.coefficients = coefficients
        self.delays = delays
        self.center = center
        self.device = device
        self.block_bytes = block_bytes
        self._modes = None

    def __call__(self) -> np.ndarray:
        """The modes, ``((delays + 1) features, r)``: the same read-only array on every call."""
        if self._modes is None:
            self._modes = self._compute()
        return self._modes

    def _compute(self) -> np.ndarray:
        delays, width = self.delays, self.coefficients.shape[1]
        # Delay block d of a mode sums the snapshots d steps after each y's oldest one.
        weights = np.zeros((self.trajectories.steps, (delays + 1) * width))
        for d in range(delays + 1):
            weights[self.oldest_rows + d, d * width : (d + 1) * width] = self.coefficients
        if self.center:  # Z_c^T M = Z^T P M
            weights -= weights.mean(axis=0)
        product = streamed_product(
            self.trajectories, weights, device=self.device, block_bytes=self.block_bytes
        ).view(np.complex128)  # (features, (delays + 1) rank), no copy
        if delays:
            product = np.vstack(np.split(product, delays + 1, axis=1))
        modes = fix_mode_phases(product, overwrite=True)
        modes.setflags(write=False)  # the one cached array every caller gets
        return modes


class HankelDMD(DMD):
    """Exact DMD of delay-embedded snapshots ``h_t = [x_t, x_{t+1}, ..., x_{t+D}]``.

    Parameters
    ----------
    delays : int
        ``D``, delays per embedded snapshot (0 is plain DMD). Redman et al. use 4 on the 2-D
        iterates of mirror and gradient descent [1]_.
    rank, center, residuals, amplitudes, modes, device, block_bytes, method
        As in :class:`DMD`; ``rank=None`` and ``"svd"`` on a 10 x 2375 embedding reproduce the
        paper's full-rank DMD. Modes are ``((D + 1) features, r)``, oldest delay on top.

    Notes
    -----
    The embedded matrix is never formed: its Gram is a sum of ``D + 1`` shifted blocks of
    the base Gram, its QR factor the stack of shifted column blocks of the base ``R``
    (:mod:`koopkit.linalg.hankel`). Delay windows stay inside each trajectory.

    References
    ----------
    .. [1] W. T. Redman, J. M. Bello-Rivas, M. Fonoberova, R. Mohr, I. G. Kevrekidis,
       I. Mezic, "Identifying equivalent training dynamics", NeurIPS 2024.
    """

    name = "hankel-dmd"

    def __init__(
        self,
        delays: int = 4,
        rank=None,
        *,
        center: bool = False,
        residuals: bool = True,
        amplitudes: bool = False,
        modes: bool = False,
        device=None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        method: str = "auto",
    ):
        _check_int("delays", delays, minimum=0)
        self.delays = int(delays)
        self._set_options(rank, center, residuals, amplitudes, modes, device, block_bytes, method)


class PCAHankelDMD(_Estimator):
    """Exact DMD of delay-embedded principal-component scores, as Redman et al. do for Transformers.

    Parameters
    ----------
    components : int
        Principal components ``k`` of the stacked snapshots of all trajectories.
    delays : int
        Delays of the scores' embedding (0 is DMD on the scores).
    center : bool
        True: scores of the centered snapshots (``sklearn.decomposition.PCA.transform``).
        False: the paper's uncentered projection ``Z C^T`` onto the same principal directions,
        scores plus a constant offset [1]_.
    rank, residuals, amplitudes, modes, device, block_bytes, method
        As in :class:`DMD`; ``method`` factors the raw snapshots for the PCA. Modes live in
        the ``(D + 1) k``-dimensional embedded score space, oldest delay on top.

    Notes
    -----
    The principal directions are the left singular vectors ``U`` of the centered factor
    ``F P`` (``Z^T = Q F``, ``P = I - 1 1^T / T``), so the scores ``S V^T`` (centered) or
    ``U^T F`` (uncentered) come from T x T work, with no features x T SVD. Then delays, then
    exact DMD on ``k (D + 1)`` features, always the small side.

    References
    ----------
    .. [1] W. T. Redman, J. M. Bello-Rivas, M. Fonoberova, R. Mohr, I. G. Kevrekidis,
       I. Mezic, "Identifying equivalent training dynamics", NeurIPS 2024.
    """

    name = "pca-hankel"

    def __init__(
        self,
        components: int = 10,
        delays: int = 32,
        *,
        center: bool = True,
        rank=None,
        residuals: bool = True,
        amplitudes: bool = False,
        modes: bool = False,
        device=None,
        block_bytes: int = DEFAULT_BLOCK_BYTES,
        method: str = "auto",
    ):
        _check_int("components", components, minimum=1)
        _check_int("delays", delays, minimum=0)
        self.components = int(components)
        self.delays = int(delays)
        self._set_options(rank, center, residuals, amplitudes, modes, device, block_bytes, method)

    def fit(self, trajectories) -> Spectrum:
        """Estimate the spectrum of the trajectories' principal-component scores."""
        trajectories = Trajectories.from_input(trajectories)
        most = min(trajectories.features, trajectories.steps)
        if self.components > most:
            raise InsufficientDataError(
                f"Expected at most {most} components for {trajectories.features} features and "
                f"{trajectories.steps} snapshots. Got {self.components} instead."
            )
        features = self.components * (self.delays + 1)
        self._check_sizes(trajectories, self.delays, features)
        get_gram = self._gram_getter(trajectories)

        method, (dmd, embedded) = self._estimate(
            self._first_method(trajectories.features, trajectories.steps),
            lambda m: self._embedded_dmd(trajectories, m, get_gram),
            get_gram,
        )
        lengths = embedded_lengths(trajectories.lengths, self.delays)
        modes = None
        if self.modes:
            y = snapshot_pairs(lengths)[1]
            modes = fix_mode_phases(embedded[:, y] @ dmd.mode_coefficients)
        return Spectrum(
            eigenvalues=dmd.eigenvalues,
            amplitudes=dmd.amplitudes,
            residuals=dmd.residuals,
            modes=modes,
            meta=self._meta(trajectories, method, dmd),
        )

    def _embedded_dmd(self, trajectories, method, get_gram):
        """Exact DMD of the delay-embedded scores, and those scores ``(k (D + 1), T')``.

        ``(None, None)`` when ``"auto"`` should move to ``"qr"``: the Gram does not resolve
        the last component.
        """
        if method == "gram":
            factor = gram_factor(get_gram())
        else:
            factor = self._raw_factor(trajectories, method, get_gram)
        noise = self._rounding_noise(trajectories, _frobenius(factor))
        directions, singular_values, right = np.linalg.svd(
            center_factor(factor), full_matrices=False
        )
        k = self.components
        if method == "gram":
            if self.method == "auto":
                if gram_accuracy_lost(singular_values[:k], _frobenius(get_gram())):
                    return None, None
            else:
                noise = max(noise, gram_noise(self._gram_scale(get_gram()), trajectories.steps))
        if self.center:
            scores = singular_values[:k, None] * right[:k]
        else:
            scores = directions[:, :k].T @ factor
        embedded = hankel_factor(scores, trajectories.lengths, self.delays)
        dmd = exact_dmd(
            embedded,
            embedded_lengths(trajectories.lengths, self.delays),
            self.rank,
            self.components * (self.delays + 1),
            noise=noise,
            residuals=self.residuals,
            amplitudes=self.amplitudes,
        )
        return dmd, embedded


_SMALLEST_GRAM = np.finfo(np.float64).tiny / (np.finfo(np.float64).eps * GRAM_RELATIVE_ACCURACY)
_LARGEST_GRAM = 1e300  # room for the sums of delay blocks and the CholeskyQR shift


def _check_gram_range(gram: np.ndarray, trajectories: Trajectories, block_bytes: int) -> None:
    """Refuse data whose Gram leaves float64's normal range, where it silently loses digits.

    Every resolved Gram eigenvalue must be a normal number: the trace must be at least
    ``tiny / (eps * GRAM_RELATIVE_ACCURACY)``. A trace of zero is all-zero data, which
    passes here and fails the rank rules with their own message, unless the squares of
    nonzero values underflowed (below about 1e-162): one more pass tells them apart.
    """
    trace = float(np.trace(gram))
    if trace == 0:
        blocks = trajectories.blocks(block_bytes=block_bytes, reuse=True, check_finite=False)
        if not any(np.any(block) for _, block in blocks):
            return
    if not _SMALLEST_GRAM <= trace <= _LARGEST_GRAM:
        raise EstimationError(
            f"Expected snapshots whose summed squares lie between {_SMALLEST_GRAM:.0e} and "
            f"{_LARGEST_GRAM:.0e}, the range of float64 the Gram needs. Got {trace:.3g} instead; "
            "rescale the data."
        )


def _frobenius(matrix: np.ndarray) -> float:
    """``||matrix||_F`` without overflowing the squares of entries above 1e154."""
    top = float(np.abs(matrix).max(initial=0.0))
    return top * float(np.linalg.norm(matrix / top)) if top else 0.0


def _check_device(device) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise EstimationError(
            f"Expected device to be a torch device such as 'cuda' or 'cpu'. Got {device!r} instead."
        ) from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise EstimationError(f"Expected a CUDA device for device={device!r}. Torch finds none.")


def _check_int(name: str, value, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise EstimationError(
            f"Expected {name} to be an int of at least {minimum}. Got {value!r} instead."
        )
