"""Figures: what the legends and panels say."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from koopkit import plots


def _captured_figures(monkeypatch):
    plt = plots._pyplot()
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
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
