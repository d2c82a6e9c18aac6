"""Shared numerics: streamed Gram matrices and factors of the snapshots, delays, rank rules.

Trajectories are tall (many features) and short (few snapshots). Everything here streams the
features in blocks and works with snapshot-by-snapshot (T x T) objects.
"""

from .blocks import BAND_BLOCKS, DEFAULT_BLOCK_BYTES, Trajectories
from .factor import (
    GRAM_RELATIVE_ACCURACY,
    center_factor,
    cholesky_qr,
    gram_accuracy_lost,
    gram_noise,
    tsqr,
)
from .gram import center_gram, gram_factor, streamed_gram, streamed_product
from .hankel import delay_window_starts, embedded_lengths, hankel_factor, hankel_gram
from .rank import (
    RANK_RULES,
    check_rank_rule,
    optimal_hard_threshold,
    rounding_noise,
    select_rank,
)

__all__ = [
    "BAND_BLOCKS",
    "DEFAULT_BLOCK_BYTES",
    "GRAM_RELATIVE_ACCURACY",
    "RANK_RULES",
    "Trajectories",
    "center_factor",
    "center_gram",
    "check_rank_rule",
    "cholesky_qr",
    "delay_window_starts",
    "embedded_lengths",
    "gram_accuracy_lost",
    "gram_factor",
    "gram_noise",
    "hankel_factor",
    "hankel_gram",
    "optimal_hard_threshold",
    "rounding_noise",
    "select_rank",
    "streamed_gram",
    "streamed_product",
    "tsqr",
]
