"""Panel overlays: palette blend inside a region, a white outline on its edge, background untouched."""

import numpy as np

from icf.eval.visualize import overlay, region_edges


def test_region_edges_are_the_boundary_of_each_region() -> None:
    ids = np.zeros((6, 6), np.uint8)
    ids[1:5, 1:5] = 3
    ids[2:4, 4:5] = 5  # a second class touching the first: both sides of the contact are edges
    edges = region_edges(ids)
    assert not edges[ids == 0].any()
    assert not edges[2:4, 2:3].any()  # interior of class 3
    assert edges[1, 1:5].all() and edges[4, 1:5].all() and edges[2:4, 3].all() and edges[2:4, 4].all()


def test_overlay_blends_inside_outlines_edges_and_keeps_background() -> None:
    rgb = np.full((5, 5, 3), 100, np.uint8)
    ids = np.zeros((5, 5), np.uint8)
    ids[0:4, 0:4] = 1
    palette = np.array([[0, 0, 0], [200, 0, 0]], np.uint8)
    out = overlay(rgb, ids, palette)
    assert (out[4, 4] == 100).all()  # background
    assert (out[0, 0] == 255).all()  # edge (image border)
    assert np.allclose(out[1, 1], [0.45 * 100 + 0.55 * 200, 45, 45], atol=1)  # interior blend, ALPHA = 0.55
