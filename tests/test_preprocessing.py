"""Preprocessing that travels with the model: exact normalisation, resize/crop, every PIL mode."""

import numpy as np
import pytest
from PIL import Image

from deploykit.preprocessing import Preprocessing, to_model_mode

GRAY = Preprocessing(input_size=(1, 28, 28), mean=(0.5,), std=(0.25,))
RGB = Preprocessing(input_size=(3, 32, 32), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                    interpolation="bicubic", crop_pct=0.875)


def test_uint8_normalisation_is_exact():
    x = GRAY.from_uint8(np.full((2, 28, 28), 255, np.uint8))
    assert x.shape == (2, 1, 28, 28) and x.dtype == np.float32
    np.testing.assert_allclose(x, 2.0)  # (1 - 0.5) / 0.25


def test_file_and_array_paths_agree_at_native_size():
    arr = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(GRAY.from_pil(Image.fromarray(arr, "L")), GRAY.from_uint8(arr[None]))


def test_resize_then_centre_crop_like_timm_eval():
    img = Image.new("RGB", (100, 50), (255, 0, 0))
    x = RGB.from_pil(img)
    assert x.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(x[0, :, 16, 16], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], atol=1e-2)


@pytest.mark.parametrize("mode, make", [
    ("L", lambda: Image.new("L", (8, 8), 128)),
    ("P", lambda: Image.new("RGB", (8, 8), (128, 128, 128)).convert("P", palette=Image.Palette.ADAPTIVE)),
    ("RGBA", lambda: Image.new("RGBA", (8, 8), (128, 128, 128, 255))),
    ("LA", lambda: Image.new("LA", (8, 8), (128, 255))),
    ("CMYK", lambda: Image.new("RGB", (8, 8), (128, 128, 128)).convert("CMYK")),
    ("I;16", lambda: Image.new("I;16", (8, 8), 128 * 257)),
])
def test_every_mode_maps_to_the_same_gray(mode, make):
    out = to_model_mode(make(), 3)
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out, np.int16) - 128).max() <= 1, mode


def test_transparent_pixels_become_white():
    out = to_model_mode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), 1)
    assert out.mode == "L" and np.asarray(out).min() == 255


def test_rgb_image_to_gray_model_and_gray_image_to_rgb_model():
    assert GRAY.from_pil(Image.new("RGB", (28, 28), (10, 200, 30))).shape == (1, 1, 28, 28)
    assert RGB.from_pil(Image.new("L", (32, 32), 7)).shape == (1, 3, 32, 32)


def test_mean_std_must_match_channels():
    with pytest.raises(ValueError, match="mean/std need 3 values"):
        Preprocessing(input_size=(3, 8, 8), mean=(0.5,), std=(0.5,))
