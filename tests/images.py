"""Test images: seeded noise, its encodings (OpenCV, RGB in), and hostile ones."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """`n` RGB noise images [n, size, size, 3] uint8, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def encode(ext: str, image: np.ndarray) -> bytes:
    """OpenCV encoding (".png", ".jpg", ...) of an RGB (H,W,3), RGBA (H,W,4) or gray (H,W) image."""
    if image.ndim == 3:
        image = image[..., [2, 1, 0, 3][:image.shape[2]]]  # RGB(A) -> BGR(A)
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


def png(image: np.ndarray) -> bytes:
    return encode(".png", image)


def jpeg(image: np.ndarray) -> bytes:
    return encode(".jpg", image)


# --- hostile images: bombs, lying headers, formats the server refuses ----------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 16000) -> bytes:
    """A valid 8-bit grayscale PNG of side x side black pixels (~250 KB for 16000: 768 MB as RGB)."""
    compressor = zlib.compressobj(9)
    row = bytes(1 + side)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(jpeg(random_images(1, 32, 3)[0]))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0))


def gif(image: np.ndarray) -> bytes:
    from PIL import Image  # comes with matplotlib

    out = io.BytesIO()
    Image.fromarray(image).quantize(64).save(out, "GIF")
    return out.getvalue()
