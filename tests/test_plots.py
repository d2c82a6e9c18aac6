"""Figures: what the legends and panels say."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from koopkit import plots


def _captured_figures(monkeypatch):
    figures = []
    make = plots._figure

    def keep(**kwargs):
        figures.append(make(**kwargs))
        return figures[-1]

    monkeypatch.setattr(plots, "_figure", keep)
    return figures


def test_plot_spectra_legend_names_the_grouping_and_each_label_once(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    spectra = [
        ("w=40", SimpleNamespace(eigenvalues=np.array([0.9, 0.5 + 0.1j]))),
        ("w=5", SimpleNamespace(eigenvalues=np.array([0.99]))),
        ("w=40", SimpleNamespace(eigenvalues=np.array([0.95]))),
    ]
    path = tmp_path / "eigenvalues.png"
    plots.plot_spectra(spectra, path, legend_title="width")
    legend = figures[0].axes[0].get_legend()
    assert legend.get_title().get_text() == "width"
    assert [t.get_text() for t in legend.get_texts()] == ["w=40", "w=5"]
    assert figures[0].axes[1].get_title() == "zoom"
    assert path.read_bytes().startswith(b"\x89PNG")


def _comparison(test, replicates=3, conditions=2):
    """``conditions`` conditions of spectra from 0.5 to 0.9, compared with ``test``."""
    from koopkit.pipeline import Group, SpectrumResult, compare_spectra
    from koopkit.results import Spectrum

    rng = np.random.default_rng(0)
    spectra = [
        SpectrumResult(
            Group((f"{c}{i}",), {}, condition=c, replicate=i),
            Spectrum(center + 0.02 * rng.normal(size=4)),
        )
        for c, center in zip(
            "abcdefghijklmno"[:conditions], np.linspace(0.5, 0.9, conditions), strict=True
        )
        for i in range(replicates)
    ]
    return compare_spectra(spectra, test=test)


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_plot_comparison_labels_an_uncalibrated_score_as_such(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    plots.plot_comparison(_comparison("bootstrap"), tmp_path / "boot.png")
    heatmap, draws = figures[0].axes[1], figures[0].axes[2]
    assert "uncalibrated" in heatmap.get_title() and "Holm" in heatmap.get_title()
    assert any("p (uncal.)=" in t for t in _texts(heatmap))
    assert not any("\np=" in t for t in _texts(heatmap))
    assert draws.get_title().startswith("bootstrap draws, a vs b (uncalibrated p=")
    assert draws.get_xlabel() == "bootstrap draws of the mean between distance"

    plots.plot_comparison(_comparison("permutation"), tmp_path / "perm.png")
    heatmap, null = figures[1].axes[1], figures[1].axes[2]
    assert heatmap.get_title() == "mean distances\npermutation: Holm-corrected p-values"
    assert any("\np=0.1" in t for t in _texts(heatmap))  # 3 + 3: exact p = 2/20
    assert null.get_title().startswith("permutation null, a vs b (p=0.1")
    assert "between − within" in null.get_xlabel()


def test_plot_comparison_shows_no_within_distance_for_a_single_spectrum(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    comparison = _comparison(None, replicates=1)
    assert np.isnan(np.diag(comparison.distance_mean)).all()
    plots.plot_comparison(comparison, tmp_path / "single.png")
    texts = _texts(figures[0].axes[1])
    assert texts.count("n/a") == 2 and "0" not in texts
    shown = [t for t in figures[0].axes[1].texts if t.get_text() == "n/a"]
    assert all(t.get_color() == "k" for t in shown)  # readable on the empty cell
    assert (tmp_path / "single.png").read_bytes().startswith(b"\x89PNG")


def test_plotting_leaves_the_callers_backend_and_figures_alone(tmp_path):
    """A notebook's (or script's) pyplot backend and open figures survive a koopkit figure."""
    import subprocess
    import sys

    code = f"""
import matplotlib
matplotlib.use("svg")
import matplotlib.pyplot as plt
import numpy as np
from koopkit import plots
from koopkit.results import Spectrum
plt.figure()
plots.plot_spectra([("a", Spectrum([0.9]))], {str(tmp_path / "a.png")!r})
print(matplotlib.get_backend(), plt.get_fignums())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["svg", "[1]"]
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


def test_plot_spectra_draws_empty_and_non_finite_spectra(tmp_path):
    from koopkit.results import Spectrum

    cases = {
        "empty": [("a", Spectrum(np.array([], dtype=complex)))],
        "nan": [("a", Spectrum([np.nan, np.inf]))],
        "none": [],
    }
    for name, spectra in cases.items():
        plots.plot_spectra(spectra, tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes().startswith(b"\x89PNG"), name


def test_many_conditions_get_distinct_markers_and_room(tmp_path, monkeypatch):
    figures = _captured_figures(monkeypatch)
    spectra = [(f"c{k}", SimpleNamespace(eigenvalues=np.array([0.1 * k]))) for k in range(15)]
    plots.plot_spectra(spectra, tmp_path / "many.png", zoom=False)
    legend = figures[0].axes[0].get_legend()
    styles = {
        (tuple(h.get_facecolor()[0]), h.get_paths()[0].vertices.tobytes())
        for h in legend.legend_handles
    }
    assert len(styles) == 15  # colours repeat after 10; the markers tell them apart

    plots.plot_comparison(_comparison(None, replicates=1, conditions=15), tmp_path / "c.png")
    width, height = figures[1].get_size_inches()
    assert height >= 15 * 0.6  # room for each cell's text


def test_labels_with_dollar_signs_are_drawn_literally(tmp_path):
    """Tag values are data: ``$\\foo{$`` is not mathtext, and must not fail the figure."""
    import matplotlib

    from koopkit.pipeline import Group, SpectrumResult, compare_spectra
    from koopkit.results import Spectrum

    bad = "$\\foo{$"
    plots.plot_spectra([(bad, Spectrum([0.9, 0.5]))], tmp_path / "s.png", legend_title="$x")
    spectra = [
        SpectrumResult(Group((f"{c}{i}",), {}, condition=c, replicate=i), Spectrum([z, 0.5]))
        for c, z in ((bad, 0.9), ("$1", 0.7))
        for i in range(3)
    ]
    plots.plot_comparison(compare_spectra(spectra, test="permutation"), tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes().startswith(b"\x89PNG")
    assert matplotlib.rcParams["text.parse_math"]  # the caller's setting is back


def _contrast(a, b) -> float:
    """WCAG 2 contrast ratio of two colours (1 to 21)."""
    from matplotlib.colors import to_rgb

    def luminance(color):
        c = np.asarray(to_rgb(color))
        c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]

    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_heatmap_labels_contrast_with_their_cells(tmp_path, monkeypatch):
    """imshow stretches the colours from the smallest value to the largest: a cell at the
    bottom of the colormap is dark (white text) even when its value is most of the largest."""
    figures = _captured_figures(monkeypatch)
    mean = np.array([[0.6, 1.0, 0.8], [1.0, 0.7, 0.9], [0.8, 0.9, np.nan]])
    comparison = SimpleNamespace(
        conditions=["a", "b", "c"],
        spectra=[
            SimpleNamespace(
                group=SimpleNamespace(condition=c), spectrum=SimpleNamespace(eigenvalues=[0.9])
            )
            for c in "abc"
        ],
        distance_mean=mean,
        p_value_holm=np.full((3, 3), np.nan),
        tests={},
        test_name=None,
    )
    plots.plot_comparison(comparison, tmp_path / "heat.png")
    heatmap = figures[0].axes[1]
    image = heatmap.images[0]
    assert image.get_cmap().name == "viridis"
    colors = {}
    for text in heatmap.texts:
        j, i = text.get_position()
        colors[text.get_text()] = text.get_color()
        cell = image.to_rgba(mean[i, j]) if np.isfinite(mean[i, j]) else heatmap.get_facecolor()
        assert _contrast(text.get_color(), cell) >= 4.5, text.get_text()
    assert colors["0.6"] == "w"  # the darkest cell
    assert colors["1"] == "k"  # the brightest
    assert colors["n/a"] == "k"  # on the white axes
