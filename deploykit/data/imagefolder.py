"""ImageFolder datasets: ``root/<class>/<image>``, optionally with ``train/`` and ``val/`` (or ``test/``).

Without a val/test folder, a seeded 80/20 split per class keeps evaluation images out of calibration.

Example:
    >>> train, val = load_imagefolder_splits(Path("data/flowers"))
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError
from . import ImageSet

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
# Decompression-bomb guard: larger images are refused rather than decoded into gigabytes.
MAX_PIXELS = 64_000_000


def open_image(path: Path):
    """Open and fully decode an image file; a clear DataError when it is not a readable image."""
    from PIL import Image, UnidentifiedImageError

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path} is not a readable image ({type(err).__name__}: {err})",
                        fix="remove or replace the file") from None


def load_imagefolder(root: Path, name: str | None = None, class_names: list[str] | None = None) -> ImageSet:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist",
                        fix="pass --data <ImageFolder dir> or --data fashion-mnist")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = class_names or found
    if not classes:
        raise DataError(f"{root} has no class sub-directories",
                        fix="lay images out as <root>/<class_name>/<image>.jpg")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        cls_dir = root / cls
        files = sorted(p for p in cls_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if cls_dir.is_dir() else []
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"{root} contains no image files ({', '.join(sorted(IMAGE_SUFFIXES))})",
                        fix="check the path; images must sit in <root>/<class_name>/")
    check_images(paths, root)
    return ImageSet(name=name or root.name, class_names=list(classes), labels=np.array(labels), paths=paths)


def check_images(paths: list[Path], root: Path) -> None:
    """Every file is a readable image, checked before any heavy stage runs; all bad files are named at once.

    ``verify()`` reads each file's structure without decoding its pixels, so a whole folder is cheap to check
    (a truncated or non-image file found after export would cost the run).
    """
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    bad = []
    for path in paths:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as err:  # PIL raises many types for damaged files; each one is a bad file here
            bad.append(f"{path.relative_to(root)} ({type(err).__name__})")
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... ({len(bad) - 10} more)" if len(bad) > 10 else "")
        raise DataError(f"{len(bad)} of {len(paths)} files under {root} are not readable images: {shown}",
                        fix="remove or replace those files (or move them out of the class folders)")


def empty_classes(*sets: ImageSet) -> list[str]:
    """Class names that have no image in any of ``sets`` (an empty class folder)."""
    names = sets[0].class_names
    seen = np.zeros(len(names), bool)
    for s in sets:
        seen[np.unique(s.labels)] = True
    return [names[i] for i in np.flatnonzero(~seen)]


def load_imagefolder_splits(root: Path, seed: int = 0, eval_fraction: float = 0.2) -> tuple[ImageSet, ImageSet]:
    root = Path(root)
    for train_name, eval_name in (("train", "val"), ("train", "test"), ("train", "validation")):
        if (root / train_name).is_dir() and (root / eval_name).is_dir():
            train = load_imagefolder(root / train_name, name=f"{root.name}:train")
            ev = load_imagefolder(root / eval_name, name=f"{root.name}:{eval_name}", class_names=train.class_names)
            return train, ev
    full = load_imagefolder(root)
    rng = np.random.default_rng(seed)
    is_eval = np.zeros(len(full), bool)
    for c in range(full.num_classes):
        idx = rng.permutation(np.flatnonzero(full.labels == c))
        is_eval[idx[: max(1, int(round(len(idx) * eval_fraction)))] if len(idx) > 1 else []] = True
    return (full.subset(np.flatnonzero(~is_eval), f"{root.name}:train"),
            full.subset(np.flatnonzero(is_eval), f"{root.name}:eval"))
