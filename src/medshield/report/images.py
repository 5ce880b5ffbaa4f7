"""Small inline thumbnails of the images that sample rows refer to.

A row may name its image by path (``image`` or ``image_path``, absolute or relative to the run
directory), its images by a list of paths (``image_files``: what a red-team model received,
shown side by side), or only by benchmark item id (red-teaming rows written before
``image_files``): ids are looked up in the safety source named by the run's ``config.yaml``,
which gives the image before any attack. Images that cannot be found are left out (the browser
shows the id instead); thumbnails never make rendering fail.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from medshield.report.rundir import RunData

THUMBNAIL_PX = 64
MAX_THUMBNAILS = 400  # distinct images inlined at most (about 1-3 kB each)


PATHS = " + "  # joins the paths of a row's images into its key


def _image_paths(row: dict[str, Any]) -> list[str]:
    files = row.get("image_files")
    if isinstance(files, list) and files and all(isinstance(f, str) and f for f in files):
        return files
    path = row.get("image_path") or row.get("image")
    return [path] if isinstance(path, str) and path else []


def image_key(row: dict[str, Any]) -> str | None:
    """What identifies a row's image: its path(s) when given, else its item id."""
    paths = _image_paths(row)
    if paths:
        return PATHS.join(paths)
    return str(row["id"]) if row.get("id") is not None else None


def _png_uri(image: Image.Image) -> str:
    image = image.convert("RGB")
    scale = THUMBNAIL_PX / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # small medical images (MedMNIST's 28 px) are enlarged with visible pixels, large ones reduced
    image = image.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _from_path(run_dir: Path, text: str) -> Image.Image | None:
    path = Path(text)
    path = path if path.is_absolute() else run_dir / path
    if not path.is_file():
        return None
    with Image.open(path) as image:
        image.load()
        return image


def _side_by_side(images: list[Image.Image]) -> Image.Image:
    """Images in a row, scaled to the height of the tallest, with a white gap between."""
    height = max(i.height for i in images)
    scaled = [
        i.convert("RGB").resize((max(1, round(i.width * height / i.height)), height))
        for i in images
    ]
    gap = max(1, height // 16)
    strip = Image.new(
        "RGB", (sum(i.width for i in scaled) + gap * (len(scaled) - 1), height), "white"
    )
    x = 0
    for image in scaled:
        strip.paste(image, (x, 0))
        x += image.width + gap
    return strip


def _from_paths(run_dir: Path, key: str) -> Image.Image | None:
    found = [_from_path(run_dir, text) for text in key.split(PATHS)]
    if any(image is None for image in found):
        return None
    return found[0] if len(found) == 1 else _side_by_side(found)


def _benchmark_images(config: dict[str, Any], ids: set[str]) -> dict[str, Image.Image]:
    """Images of the benchmark items ``ids`` from the run config's safety source."""
    from medshield.data.safety import load_safety_items

    modalities: Sequence[str | None] = config.get("modalities") or [None]
    found: dict[str, Image.Image] = {}
    for modality in modalities:
        items = load_safety_items(
            config.get("source", "medshield"),
            modality=modality,
            data_dir=config.get("data_dir"),
            path=config.get("query_file"),
            **(config.get("source_options") or {}),
        )
        for item in items:
            if item.id in ids and item.id not in found:
                tensor = item.load_image(config.get("data_dir"))
                array = (tensor.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                found[item.id] = Image.fromarray(array)
    return found


def thumbnails(run: RunData, rows: Sequence[dict[str, Any]]) -> tuple[dict[str, str], str]:
    """``{image key: data URI}`` for the rows' images that can be found, and a note on the rest.

    At most :data:`MAX_THUMBNAILS` distinct images, in row order.
    """
    keys = list(dict.fromkeys(k for k in map(image_key, rows) if k is not None))
    wanted, dropped = keys[:MAX_THUMBNAILS], len(keys) - MAX_THUMBNAILS
    images: dict[str, Image.Image] = {}
    problems = []
    by_path = {PATHS.join(p) for r in rows if (p := _image_paths(r))}
    for key in (k for k in wanted if k in by_path):
        try:
            image = _from_paths(run.path, key)
        except OSError as exc:
            problems.append(f"{key}: {exc}")
            continue
        if image is not None:
            images[key] = image
    ids = {k for k in wanted if k not in by_path}
    if ids and "source" in run.config:
        try:
            images.update(_benchmark_images(run.config, ids))
        except Exception as exc:  # noqa: BLE001 - a missing data set only costs the thumbnails
            problems.append(f"benchmark images unavailable ({type(exc).__name__}: {exc})")
    notes = []
    if dropped > 0:
        notes.append(f"thumbnails of the first {MAX_THUMBNAILS} images only")
    missing = len(wanted) - len(images)
    if missing:
        notes.append(f"{missing} image{'s' * (missing > 1)} not found (ids shown instead)")
    notes += problems[:3]
    return {k: _png_uri(v) for k, v in images.items()}, "; ".join(notes)
