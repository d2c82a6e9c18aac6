"""Figures: spectra in the complex plane, distance heatmaps with p-values, permutation nulls."""

from __future__ import annotations

import functools

import numpy as np

MARKERS = "o^sDvP*X<>"
"""Markers cycled once the colour cycle runs out, so many conditions stay distinguishable."""


def _plain_text(draw):
    """Draw with every text taken literally: labels are tag values, and a ``$`` in one would
    otherwise be parsed as mathtext and could fail the whole figure."""

    @functools.wraps(draw)
    def plain(*args, **kwargs):
        import matplotlib

        with matplotlib.rc_context({"text.parse_math": False}):
            return draw(*args, **kwargs)

    return plain


def _figure(**kwargs):
    """A figure outside pyplot: it renders headless and leaves the caller's backend and
    open figures alone (``matplotlib.use`` would switch a notebook's backend)."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def _style(k: int) -> dict:
    """Colour and marker of the ``k``-th label: a new marker after every colour cycle."""
    import matplotlib

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    return {"color": colors[k % len(colors)], "marker": MARKERS[k // len(colors) % len(MARKERS)]}


def _text_color(rgba) -> str:
    """Black or white, whichever contrasts more with the colour ``rgba`` (WCAG 2).

    Black's contrast is (L + 0.05) / 0.05 and white's 1.05 / (L + 0.05), for the colour's
    relative luminance L; they are equal at L = 0.179.
    """
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
    luminance = 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]
    return "k" if (luminance + 0.05) ** 2 > 1.05 * 0.05 else "w"


def _unit_circle(ax):
    theta = np.linspace(0, 2 * np.pi, 400)
    ax.plot(np.cos(theta), np.sin(theta), color="0.6", lw=0.8, zorder=0)
    ax.axhline(0, color="0.85", lw=0.5, zorder=0)
    ax.axvline(0, color="0.85", lw=0.5, zorder=0)
    ax.set_aspect("equal")
    ax.set_xlabel("Re λ")
    ax.set_ylabel("Im λ")


@_plain_text
def plot_spectra(
    labelled_spectra, path, title="Koopman eigenvalues", zoom=True, legend_title="condition"
):
    """Eigenvalues per label with the unit circle; a zoomed panel near λ = 1."""
    fig = _figure(figsize=(11 if zoom else 5.5, 5))
    axes = fig.subplots(1, 2 if zoom else 1, squeeze=False)
    labels = list(dict.fromkeys(label for label, _ in labelled_spectra))
    for ax in axes[0]:
        _unit_circle(ax)
        for label, spectrum in labelled_spectra:
            z = spectrum.eigenvalues
            style = _style(labels.index(label))
            ax.scatter(z.real, z.imag, s=18, alpha=0.7, label=str(label), **style)
    handles, names = axes[0][0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    axes[0][0].legend(unique.values(), unique.keys(), title=legend_title, fontsize=8)
    axes[0][0].set_title(title)
    z = np.concatenate([np.empty(0, complex), *(s.eigenvalues for _, s in labelled_spectra)])
    z = z[np.isfinite(z)]  # NaN or Inf cannot set limits; an empty zoom keeps the defaults
    if zoom and z.size:
        near = z[np.abs(z - 1) < 0.5] if np.any(np.abs(z - 1) < 0.5) else z
        pad = max(1e-3, 0.1 * float(np.ptp(near.real) + np.ptp(near.imag)))
        axes[0][1].set_xlim(near.real.min() - pad, near.real.max() + pad)
        axes[0][1].set_ylim(near.imag.min() - pad, near.imag.max() + pad)
    if zoom:
        axes[0][1].set_aspect("auto")
        axes[0][1].set_title("zoom")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@_plain_text
def plot_comparison(comparison, path):
    """Spectra per condition, the distance heatmap annotated with Holm p-values, and a null.

    A test whose value is not a calibrated p-value (``comparison.calibrated`` False) is
    annotated as an uncalibrated p, without Holm's correction; the third panel names what
    the test's draws are (``comparison.null_label``).
    """
    has_null = any(r.null.size for r in comparison.tests.values())
    calibrated = getattr(comparison, "calibrated", True)
    scale = max(1.0, len(comparison.conditions) / 7)  # a heatmap cell holds two lines of text
    fig = _figure(figsize=(scale * (16 if has_null else 11), scale * 5))
    axes = fig.subplots(1, 3 if has_null else 2)
    ax = axes[0]
    _unit_circle(ax)
    for k, condition in enumerate(comparison.conditions):
        z = np.concatenate(
            [
                r.spectrum.eigenvalues
                for r in comparison.spectra
                if str(r.group.condition) == condition
            ]
        )
        ax.scatter(z.real, z.imag, s=14, alpha=0.6, label=condition, **_style(k))
    ax.legend(title="condition", fontsize=8)
    ax.set_title("Koopman eigenvalues")

    ax = axes[1]
    mean = comparison.distance_mean
    image = ax.imshow(mean, cmap="viridis")
    fig.colorbar(image, ax=ax, label="mean distance")
    ticks = range(len(comparison.conditions))
    ax.set_xticks(ticks, comparison.conditions, rotation=45, ha="right")
    ax.set_yticks(ticks, comparison.conditions)
    shown = comparison.p_value_holm if calibrated else comparison.p_value
    p_name = "p" if calibrated else "p (uncal.)"
    for i in ticks:
        for j in ticks:
            cell = mean[i, j]
            text = "n/a" if np.isnan(cell) else f"{cell:.3g}"
            p = shown[i, j]
            if not np.isnan(p):
                text += f"\n{p_name}={p:.3g}"
            # imshow masks NaN and Inf: the text of such a cell lies on the axes' background
            shade = image.cmap(image.norm(cell)) if np.isfinite(cell) else ax.get_facecolor()
            color = _text_color(shade)
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    if comparison.test_name is None or np.isnan(shown).all():
        ax.set_title("mean distances")
    elif calibrated:
        ax.set_title(f"mean distances\n{comparison.test_name}: Holm-corrected p-values")
    else:
        ax.set_title(f"mean distances\n{comparison.test_name}: uncalibrated p, not Holm-corrected")

    if has_null:
        ax = axes[2]
        (a, b), result = max(comparison.tests.items(), key=lambda kv: kv[1].statistic)
        ax.hist(result.null, bins=40, color="0.6")
        ax.axvline(result.statistic, color="C3", lw=2, label=f"observed ({result.statistic:.3g})")
        if calibrated:
            ax.set_title(f"{comparison.test_name} null, {a} vs {b} (p={result.p_value:.3g})")
        else:
            ax.set_title(
                f"{comparison.test_name} draws, {a} vs {b} (uncalibrated p={result.p_value:.3g})"
            )
        ax.set_xlabel(getattr(comparison, "null_label", None) or "statistic")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
