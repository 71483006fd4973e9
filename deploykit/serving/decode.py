"""Uploaded bytes -> a fully decoded PIL image, or a client error (4xx) that says what was wrong.

Pure Pillow: no BentoML here, so tests and benchmarks call it directly.

Example:
    >>> img = decode_image(Path("cat.jpg").read_bytes())
    >>> img.size
    (512, 512)
"""

from __future__ import annotations

import io
import os

from ..errors import DeployKitError

# 40 MP: a 48 MP phone photo is refused, anything a classifier sensibly sees is accepted. Pillow's own
# bomb guard (~179 MP) is far above what a 2-core server should decode per request.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
_MAGIC = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
          (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))


class InputError(DeployKitError):
    """A request the server cannot classify; ``status`` is the HTTP code the service answers with."""

    status = 400


class PayloadTooLarge(InputError):
    status = 413


# glibc returns an allocation to the OS when it is freed only above its mmap threshold, which grows (up to 32 MiB)
# as large blocks are freed; Pillow allocates decoded pixels in 16 MiB blocks, so after a few large images they come
# from the heap, and every decode thread's arena keeps its freed blocks: 12 36-MP uploads, decoded one at a time, left
# the front at 2.0 GB RSS. A fixed 4 MiB threshold (which also stops it from growing) brought it back to 241 MB.
DEFAULT_MMAP_THRESHOLD = 4 * 1024 * 1024


def return_large_buffers_to_os(threshold: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more with mmap, so freeing one returns it to the OS.

    Returns False where nothing was changed (threshold 0, not glibc, or glibc refused); jemalloc, where preloaded,
    keeps its own policy (glibc's setting then has no allocations to apply to).
    """
    import ctypes
    import platform

    if threshold <= 0 or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def max_pixels() -> int:
    return int(os.environ.get("DEPLOYKIT_MAX_PIXELS", DEFAULT_MAX_PIXELS))


def max_bytes() -> int:
    return int(os.environ.get("DEPLOYKIT_MAX_BYTES", DEFAULT_MAX_BYTES))


def decode_image(data: bytes, *, pixel_limit: int | None = None, byte_limit: int | None = None, name: str = "image"):
    """Decode one uploaded image completely (first frame, EXIF orientation applied).

    Args:
        data: the uploaded file's bytes.
        pixel_limit: refuse images with more pixels (decompression-bomb guard), checked from the header
            before any pixel is decoded.
        byte_limit: refuse larger uploads.
        name: the form field, for error messages.
    Returns:
        A loaded PIL image in its original mode (to_model_mode converts it later).
    Raises:
        InputError (400) for empty, non-image, truncated or corrupt data; PayloadTooLarge (413) over a limit.
    """
    return load_image(open_image(data, pixel_limit=pixel_limit, byte_limit=byte_limit, name=name), name=name)


def open_image(data: bytes, *, pixel_limit: int | None = None, byte_limit: int | None = None, name: str = "image"):
    """Read only the header of an upload and check its limits: cheap, no pixel is decoded yet.

    The server uses the size it reports (``img.width * img.height``) to reserve decode memory before
    ``load_image`` decodes. Same arguments and errors as ``decode_image``.
    """
    from PIL import Image, UnidentifiedImageError

    pixel_limit = pixel_limit or max_pixels()
    byte_limit = byte_limit or max_bytes()
    if not data:
        raise InputError(f"field '{name}' is empty (0 bytes)", fix="send the image file's bytes, e.g. "
                         f"curl -F {name}=@photo.jpg")
    if len(data) > byte_limit:
        raise PayloadTooLarge(f"field '{name}' is {len(data)} bytes, over the {byte_limit}-byte limit",
                              fix="send a smaller image (or raise DEPLOYKIT_MAX_BYTES)")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise PayloadTooLarge(f"field '{name}' is a decompression bomb ({err})", fix="send a smaller image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        head = data[:8]
        kind = next((k for magic, k in _MAGIC if data.startswith(magic)), None)
        if kind:
            raise InputError(f"field '{name}' starts like a {kind} but is truncated or corrupt ({len(data)} bytes: "
                             f"{type(err).__name__})", fix="re-send the complete file") from None
        raise InputError(f"field '{name}' is not an image Pillow can read ({len(data)} bytes starting {head!r}: "
                         f"{type(err).__name__})", fix="send a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None
    w, h = img.size
    if w * h > pixel_limit:
        raise PayloadTooLarge(f"image {w}x{h} has {w * h} pixels, over the {pixel_limit}-pixel limit",
                              fix="downscale it before sending (or raise DEPLOYKIT_MAX_PIXELS)")
    if w == 0 or h == 0:
        raise InputError(f"image has size {w}x{h}", fix="send a non-empty image")
    return img


def load_image(img, *, name: str = "image"):
    """Decode an image ``open_image`` returned (first frame, EXIF orientation applied)."""
    from PIL import Image, ImageOps

    try:
        img.load()  # decode now: truncation shows up here, not later inside preprocessing
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as err:
        raise PayloadTooLarge(f"field '{name}' is a decompression bomb ({err})", fix="send a smaller image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise InputError(f"{img.format or 'image'} in field '{name}' is truncated or corrupt ({err})",
                         fix="re-send the complete file") from None
    return img
