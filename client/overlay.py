"""Pictures of a heatmap: JET colours alone, or blended over the original image at its own size.

The server returns the map at the model input size (224×224); people look at their photo, so the
map is stretched back to the photo's width and height (bilinear, `cv2.resize`'s default) rather
than shrinking the photo. Images are OpenCV BGR uint8 throughout.
"""
from __future__ import annotations

import os

import cv2
import numpy as np


def read_image(source: str | os.PathLike | bytes) -> np.ndarray:
    """Decode a path or encoded bytes to BGR uint8 H×W×3, ignoring EXIF orientation as the
    server's in-graph decoder does, so the overlay lines up with what the model saw."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            source = f.read()
    image = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ValueError("OpenCV cannot decode this image")
    return image


def colorize(heatmap: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Heatmap in [0, 1] (H×W) -> JET-coloured BGR uint8, resized to `size` = (width, height)."""
    heat = np.asarray(heatmap, np.float32)
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be H×W, got shape {heat.shape}")
    if size is not None and (heat.shape[1], heat.shape[0]) != tuple(size):
        heat = cv2.resize(heat, tuple(size), interpolation=cv2.INTER_LINEAR)
    heat8 = np.round(np.clip(np.nan_to_num(heat), 0.0, 1.0) * 255.0).astype(np.uint8)
    return cv2.applyColorMap(heat8, cv2.COLORMAP_JET)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Blend the coloured heatmap over `image` (BGR uint8 H×W×3, its original size):
    `alpha * heat + (1 - alpha) * image`. The result has the image's size."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be BGR uint8 H×W×3, got {image.dtype} {image.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    color = colorize(heatmap, (image.shape[1], image.shape[0]))
    return cv2.addWeighted(color, alpha, image, 1.0 - alpha, 0.0)


def resized(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` at `size` = (width, height), bilinear: Guided Grad-CAM's picture at the photo's size."""
    return cv2.resize(image, tuple(size), interpolation=cv2.INTER_LINEAR)


def feature_grid(image: np.ndarray, maps: np.ndarray, channels: np.ndarray, tile: int = 160,
                 alpha: float = 0.5) -> np.ndarray:
    """The 6×6 debug view: each feature map over the image, labelled with its channel."""
    columns = int(np.ceil(np.sqrt(len(maps))))
    rows = int(np.ceil(len(maps) / columns))
    small = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
    grid = np.zeros((rows * tile, columns * tile, 3), np.uint8)
    for i, (fmap, channel) in enumerate(zip(maps, channels)):
        cell = overlay(small, fmap, alpha)
        cv2.putText(cell, f"#{int(channel)}", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
        row, column = divmod(i, columns)
        grid[row * tile:(row + 1) * tile, column * tile:(column + 1) * tile] = cell
    return grid


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Write a PNG, raising instead of OpenCV's silent False."""
    ok, data = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"cannot encode {path}")
    with open(path, "wb") as f:
        f.write(data.tobytes())
