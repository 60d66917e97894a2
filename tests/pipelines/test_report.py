"""Pictures: the overlay panel's legend names the classes it shows, in their colours."""

from __future__ import annotations

import numpy as np

from pipelines.report import legend_strip, overlay_panel

CLASSES = ("background", "scratch", "dent", "rust")
PALETTE = ((0, 0, 0), (230, 40, 40), (40, 200, 40), (40, 40, 230))


def test_overlay_panel_legend_shows_the_classes_in_truth_or_prediction():
    image = np.full((40, 60, 3), 128, np.uint8)
    truth = np.zeros((40, 60), np.uint8)
    truth[:10] = 1
    pred = np.zeros((40, 60), np.uint8)
    pred[30:] = 3
    plain = np.asarray(overlay_panel(image, truth, pred, PALETTE))
    panel = np.asarray(overlay_panel(image, truth, pred, PALETTE, CLASSES))
    assert plain.shape[1] == panel.shape[1] and panel.shape[0] > plain.shape[0]
    strip = panel[plain.shape[0] :].reshape(-1, 3)
    colours = {tuple(c) for c in strip}
    assert {PALETTE[0], PALETTE[1], PALETTE[3]} <= colours and PALETTE[2] not in colours  # dent absent
    # Many classes wrap onto more rows instead of running off the edge.
    many = [f"class {i}" for i in range(30)]
    wide = legend_strip(many, [(i * 8, 0, 0) for i in range(30)], list(range(30)), 120)
    assert wide.shape[1] == 120 and wide.shape[0] > 60
