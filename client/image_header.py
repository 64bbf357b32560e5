"""The size an encoded image declares in its header, read without decoding a pixel.

The explain page refuses an oversized image before sending it on, as the served graph does
(export/decode.py, whose default limit is DEFAULT_MAX_PIXELS): a 250 KB PNG can declare 16000×16000
pixels. Headers are read as the graph reads them (tests/test_shared_facts.py feeds both the same files),
so the page refuses for its header what the server would refuse, and nothing more.
"""
from __future__ import annotations

import struct

DEFAULT_MAX_PIXELS = 25_000_000  # 5000x5000: a 75 MB decoded RGB image

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG frame headers (SOFn) carry the size; C4 (DHT) and CC (DAC) share the range but are not frames.
# libjpeg, the graph's decoder, reads sequential and progressive frames and refuses the others.
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC9, 0xCA}
_JPEG_REFUSED_FRAMES = {0xC3, 0xC5, 0xC6, 0xC7, 0xC8, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, reserved
_JPEG_NO_LENGTH = {0x01, *range(0xD0, 0xD9)}  # TEM, RSTn, SOI: markers without a length field
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_MAX_SIDE = 65500  # libjpeg's JPEG_MAX_DIMENSION


def declared_size(data: bytes) -> tuple[int, int]:
    """(width, height) written in a JPEG, PNG or BMP header; ValueError for anything else."""
    if data.startswith(_PNG):
        return struct.unpack(">II", _head(data, 24, "PNG")[16:24])
    if data.startswith(b"BM"):
        width, height = struct.unpack("<ii", _head(data, 26, "BMP")[18:26])
        if width < 0:
            raise ValueError("a BMP with a negative width (corrupt)")
        return width, abs(height)  # a negative height means rows stored top-down
    if data.startswith(b"\xff\xd8\xff"):
        return _jpeg_size(data)
    raise ValueError("not a JPEG, PNG or BMP image")


def _head(data: bytes, length: int, kind: str) -> bytes:
    if len(data) < length:
        raise ValueError(f"a {kind} cut short before its size (truncated)")
    return data


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """The frame header's size, as libjpeg's jpeg_read_header finds it: only once the header is whole
    up to the start of the first scan; stray bytes before a marker are skipped."""
    size, at = None, 2
    while at + 4 <= len(data):
        marker = data[at + 1]
        if data[at] != 0xFF or marker in (0x00, 0xFF):  # a stray byte, a fill byte or a stuffed 0xFF00
            at += 1
            continue
        if marker == _JPEG_EOI:
            break
        if marker in _JPEG_NO_LENGTH:
            at += 2
            continue
        end = at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        if end > len(data):
            break
        if marker in _JPEG_REFUSED_FRAMES:
            raise ValueError(f"a lossless or hierarchical JPEG (frame marker {marker:X}): the server cannot decode it")
        if marker in _JPEG_FRAMES:
            if size is not None or end < at + 10:
                break
            height, width = struct.unpack(">HH", data[at + 5:at + 9])
            if not width or not height:
                raise ValueError("a JPEG that declares no pixels (a zero width or height)")
            if max(width, height) > _JPEG_MAX_SIDE:
                raise ValueError(f"a {width}×{height} JPEG: the server decodes none over {_JPEG_MAX_SIDE} a side")
            size = width, height
        if marker == _JPEG_SOS:
            if size is None:
                break
            return size
        at = end
    raise ValueError("a JPEG without a readable frame header (truncated or corrupt)")
