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


def test_frame_iou_is_class_aware() -> None:
    from icf.eval.visualize import frame_iou

    gt = np.zeros((4, 4), np.uint8)
    gt[0:2, 0:2] = 3  # 4 pixels of class 3
    pred = np.zeros((4, 4), np.uint8)
    pred[0:2, 0:1] = 3  # 2 right
    pred[0:2, 1:2] = 5  # 2 of the wrong class
    pred[3, 3] = 3  # 1 false positive
    assert frame_iou(pred, gt) == 2 / 5
    assert frame_iou(np.zeros_like(gt), np.zeros_like(gt)) == 1.0
    assert frame_iou((gt > 0).astype(np.uint8), (gt > 0).astype(np.uint8)) == 1.0


def test_panel_has_row_names_iou_line_and_a_legend_of_the_classes_shown(tmp_path) -> None:
    import torch
    from PIL import Image

    from icf.eval.visualize import LABEL_W, TEXT_H, legend_entries, save_panels

    names = ("background", "dog", "cat", "car")
    palette = np.array([[0, 0, 0], [250, 0, 0], [0, 250, 0], [0, 0, 250]], np.uint8)
    masks = torch.zeros(1, 2, 16, 16, dtype=torch.long)
    masks[0, :, 2:8, 2:8] = 1
    pred = masks.clone()
    pred[0, 1, 10:14, 10:14] = 3
    batch = {"uid": ["a/b"], "frames": torch.zeros(1, 2, 3, 16, 16), "masks": masks, "pred": pred,
             "gt": torch.tensor([[True, False]]), "valid": torch.tensor([[True, True]])}
    assert legend_entries([masks[0, 0].numpy(), pred[0, 1].numpy()], names, False) == [(1, "dog"), (3, "car")]
    assert legend_entries([masks[0, 0].numpy()], names, True) == [(1, "sounding object")]
    [path] = save_panels(batch, pred, tmp_path, palette, names)
    img = np.asarray(Image.open(path).convert("RGB"))
    scale = 10  # 16 px frames enlarged to ≥ 160 px
    tiles_h, tiles_w = scale * (3 * 16 + 2 * 2), scale * (2 * 16 + 2)
    assert img.shape[1] == tiles_w + LABEL_W and img.shape[0] == tiles_h + 2 * TEXT_H + 4  # one legend line
    label_column = img[:tiles_h, :LABEL_W]
    assert (label_column < 128).any()  # the row names are drawn
    legend = img[tiles_h + TEXT_H + 4 :]
    for colour in (palette[1], palette[3]):  # legend swatches of the classes shown, none for "cat"
        assert (legend == colour).all(axis=-1).any()
    assert not (legend == palette[2]).all(axis=-1).any()
    iou_line = img[tiles_h : tiles_h + TEXT_H]
    assert (iou_line < 128).any()
