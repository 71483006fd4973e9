"""TTA views and decoding as pure functions (no server): shapes, flips, zooms, averaging, bad bytes."""

import io

import numpy as np
import pytest
from PIL import Image

from helpers import png_header_only

from deploykit.errors import DeployKitError
from deploykit.serving.decode import InputError, PayloadTooLarge, decode_image
from deploykit.serving.tta import (DEFAULT_VIEWS, average_logits, make_views, parse_views, predict, rescale,
                                   softmax, top_k)


def test_parse_views_normalizes_and_rejects():
    assert parse_views(None) == DEFAULT_VIEWS == ("original", "hflip", "scale:0.9", "scale:1.1")
    assert parse_views("hflip, scale:1.10, hflip") == ("original", "hflip", "scale:1.1")
    assert parse_views("none") == parse_views("") == ("original",)
    with pytest.raises(DeployKitError, match="unknown TTA view 'vflip'"):
        parse_views("vflip")
    with pytest.raises(DeployKitError, match="between 0.5 and 2.0"):
        parse_views("scale:3")


def test_make_views_order_shape_and_flip():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 28, 28)).astype(np.float32)
    v = make_views(x, DEFAULT_VIEWS)
    assert v.shape == (12, 2, 28, 28) and v.dtype == np.float32
    for i in range(3):  # image-major: rows 4i..4i+3 are image i's views
        np.testing.assert_array_equal(v[4 * i], x[i])
        np.testing.assert_array_equal(v[4 * i + 1], x[i][:, :, ::-1])
        np.testing.assert_array_equal(v[4 * i + 1][:, 5, 0], x[i][:, 5, 27])


def test_rescale_zooms_about_the_centre():
    x = np.zeros((1, 28, 28), np.float32)
    x[0, 10:18, 10:18] = 1.0                      # a centred 8x8 square
    np.testing.assert_array_equal(rescale(x, 1.0), x)
    up, down = rescale(x, 1.1), rescale(x, 0.9)
    assert up.shape == down.shape == (1, 28, 28)
    mass = x.sum()
    assert up.sum() == pytest.approx(mass * 1.1 ** 2, rel=0.1)    # zoom in: the square grows
    assert down.sum() == pytest.approx(mass * 0.9 ** 2, rel=0.1)  # zoom out: it shrinks
    assert up[0, 14, 14] == pytest.approx(1.0) and down[0, 14, 14] == pytest.approx(1.0)
    assert down[0, 0, 0] == 0.0 and down[0, 27, 27] == 0.0        # edge padding repeats the background


def test_rescale_commutes_with_normalization():
    rng = np.random.default_rng(1)
    px = rng.random((3, 20, 20)).astype(np.float32)
    mean, std = np.array([0.4, 0.5, 0.6], np.float32)[:, None, None], np.float32(0.25)
    for s in (0.9, 1.1):
        np.testing.assert_allclose(rescale((px - mean) / std, s), (rescale(px, s) - mean) / std, atol=1e-5)


def test_average_logits_equals_manual_mean_and_topk():
    logits = np.arange(24, dtype=np.float32).reshape(8, 3)
    avg = average_logits(logits, 4)
    np.testing.assert_allclose(avg, np.stack([logits[:4].mean(0), logits[4:].mean(0)]))
    with pytest.raises(ValueError, match="multiple of 3"):
        average_logits(logits, 3)
    p = softmax(np.array([[1.0, 3.0, 2.0]]))[0]
    assert p.sum() == pytest.approx(1.0)
    assert [r["label"] for r in top_k(p, 2, ["a", "b", "c"])] == ["b", "c"]


class CountingBackend:
    """A real linear model in numpy that records every batch it is given."""

    def __init__(self, k=4):
        self.calls = []
        self.w = np.random.default_rng(2).standard_normal((k, 1 * 8 * 8)).astype(np.float32)

    def run(self, x):
        self.calls.append(x.shape)
        return x.reshape(len(x), -1) @ self.w.T


def test_predict_runs_all_views_in_one_call_and_averages():
    be = CountingBackend()
    x = np.random.default_rng(3).standard_normal((2, 1, 8, 8)).astype(np.float32)
    out = predict(be, x, DEFAULT_VIEWS, 2, ["a", "b", "c", "d"])
    assert be.calls == [(8, 1, 8, 8)]                             # 2 images x 4 views, one call
    manual = np.stack([np.mean([be.run(make_views(x[i:i + 1], (v,)))[0] for v in DEFAULT_VIEWS], axis=0)
                       for i in range(2)])
    probs = softmax(manual)
    for i in range(2):
        assert out[i]["tta_views"] == 4
        best = int(np.argmax(probs[i]))
        assert out[i]["predictions"][0]["index"] == best
        assert out[i]["predictions"][0]["probability"] == pytest.approx(float(probs[i, best]), rel=1e-5)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()




def test_decode_rejects_bad_bytes_with_status():
    good = _png(Image.fromarray(np.random.default_rng(4).integers(0, 255, (28, 28), dtype=np.uint8)))
    assert decode_image(good).size == (28, 28)
    cases = [(b"", InputError, "is empty"), (b"hello", InputError, "not an image"),
             (good[: len(good) // 2], InputError, "truncated or corrupt"),
             (good[:40], InputError, "starts like a PNG but is truncated or corrupt"),
             (png_header_only(100_000, 100_000), PayloadTooLarge, "decompression bomb|pixel limit"),
             (png_header_only(2000, 2000), PayloadTooLarge, "over the 1000000-pixel limit")]
    for data, exc, msg in cases:
        with pytest.raises(exc, match=msg) as info:
            decode_image(data, pixel_limit=1_000_000)
        assert info.value.status == (413 if exc is PayloadTooLarge else 400)
    with pytest.raises(PayloadTooLarge, match="over the 100-byte limit"):
        decode_image(good, byte_limit=100)


def test_rescale_matrix_path_equals_pillow_path():
    """Small images zoom by matrix products, large ones through Pillow: both give Pillow's bilinear zoom."""
    import deploykit.serving.tta as tta_mod

    x = np.random.default_rng(5).standard_normal((2, 3, 40, 52)).astype(np.float32)
    for s in (0.9, 1.1, 0.5, 1.7):
        fast = rescale(x, s)
        old, tta_mod.MATRIX_MAX_SIDE = tta_mod.MATRIX_MAX_SIDE, 0
        try:
            slow = rescale(x, s)
        finally:
            tta_mod.MATRIX_MAX_SIDE = old
        np.testing.assert_allclose(fast, slow, atol=2e-6)


@pytest.mark.parametrize("h, w", [(60, 80), (80, 60), (120, 200)])
def test_views_of_non_square_inputs_keep_height_and_width(h, w):
    """A 60x80 model's views: each axis is zoomed on its own (both the matrix and the Pillow path)."""
    x = np.zeros((1, 3, h, w), np.float32)
    x[..., h // 2 - 5:h // 2 + 5, w // 2 - 5:w // 2 + 5] = 1.0       # a centred square
    v = make_views(x, ("original", "hflip", "zoom:1.1", "zoom:0.9"))
    assert v.shape == (4, 3, h, w)
    np.testing.assert_array_equal(v[1], x[0][..., ::-1])
    # zoom about the centre: the square grows at 1.1 and shrinks at 0.9, staying centred
    area = [float(view[0].sum()) for view in v]
    assert area[3] < area[0] < area[2]
    ys, xs = np.nonzero(v[2][0] > 0.5)
    assert abs(ys.mean() - (h - 1) / 2) < 1.5 and abs(xs.mean() - (w - 1) / 2) < 1.5
