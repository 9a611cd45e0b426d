"""The label values adapterctl writes: the dataset's convention, and no wrap-around beyond 256 values."""

from __future__ import annotations

import numpy as np
from PIL import Image

from adapterctl.data.loader import to_annotation_values


def test_annotation_values_follow_reduce_zero_label_and_never_wrap(tmp_path):
    pred = np.array([[0, 1], [149, 2]])
    ade = to_annotation_values(pred, True, 150)
    assert ade.dtype == np.uint8 and ade.tolist() == [[1, 2], [150, 3]]
    assert to_annotation_values(pred, False, 150).tolist() == pred.tolist()
    # 300 classes (or 255 with the zero-label shift): 16-bit, values exact, also through a PNG
    wide = to_annotation_values(np.array([[0, 299], [255, 256]]), False, 300)
    assert wide.dtype == np.uint16 and wide.tolist() == [[0, 299], [255, 256]]
    assert to_annotation_values(np.array([[255]]), True, 256).tolist() == [[256]]  # 256 classes shifted: 1..256
    assert to_annotation_values(np.array([[0]]), True, 256).dtype == np.uint16  # by the class count, not the image
    assert to_annotation_values(np.array([[254]]), True, 255).dtype == np.uint8  # 1..255 still fit
    assert to_annotation_values(np.array([[255]]), False, 256).dtype == np.uint8  # 0..255 fit
    Image.fromarray(wide).save(tmp_path / "p.png")
    assert np.array(Image.open(tmp_path / "p.png")).tolist() == [[0, 299], [255, 256]]
