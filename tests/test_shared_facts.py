"""Facts of the served graph that the thin client writes down again, held equal to the graph's.

The client may import neither TensorFlow nor the exporter, so it repeats what it needs: TensorFlow's
DataType numbers and their numpy types (client/protos.py, and the C API loader's own table in
serving/servables/session.py), and how an image header declares its size and what the graph refuses for
it (client/image_header.py against export/decode.py, run here in-process). The pixel limit is written
once, in client/image_header.py, which the exporter reads; the places that take it as a default are
compared with it.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
from http import HTTPStatus

import cv2
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from camserve.client import protos
from camserve.client.image_header import DEFAULT_MAX_PIXELS, declared_size
from camserve.client.web import ExplainPage, PageError, PageLimits
from camserve.export import decode
from camserve.export.options import ExportOptions
from camserve.serving.servables import session
from images import bmp_claiming, encode, gif, jpeg_claiming, png_bomb, random_images

W, H = 37, 23  # the real images' size: odd, and not square


# -- the pixel limit ------------------------------------------------------------------------------
def test_every_default_pixel_limit_is_the_client_one():
    exported = {f.name: f.default for f in dataclasses.fields(ExportOptions)}["max_image_pixels"]
    assert exported == decode.DEFAULT_MAX_PIXELS == DEFAULT_MAX_PIXELS
    assert PageLimits().max_pixels == DEFAULT_MAX_PIXELS


# -- the dtype tables -----------------------------------------------------------------------------
def test_client_dtype_numbers_are_tensorflows():
    ours = {name: value for name, value in vars(protos).items() if name.startswith("DT_")}
    assert ours == {name: types_pb2.DataType.Value(name) for name in ours}
    enum = protos.POOL.FindEnumTypeByName("tensorflow.DataType")  # the one the client's messages carry
    assert {v.name: v.number for v in enum.values} == {"DT_INVALID": 0, **ours}
    assert session.TF_STRING == protos.DT_STRING == types_pb2.DT_STRING


@pytest.mark.parametrize("table", [protos.NUMPY_DTYPES, session.NUMPY_DTYPES], ids=["client", "loader"])
def test_dtype_table_is_tensorflows_and_numpys(table):
    for number, numpy_type in table.items():
        assert tf.as_dtype(number).as_numpy_dtype is numpy_type, types_pb2.DataType.Name(number)
        assert tf.as_dtype(np.dtype(numpy_type)).as_datatype_enum == number, numpy_type
    assert table == protos.NUMPY_DTYPES  # the client and the loader carry the same dtypes
    inverse = protos.TF_DTYPES if table is protos.NUMPY_DTYPES else session.TF_DTYPES
    assert inverse == {np.dtype(v): k for k, v in table.items()}


@pytest.mark.parametrize("number", sorted(protos.NUMPY_DTYPES), ids=types_pb2.DataType.Name)
def test_client_tensors_read_and_write_as_tensorflow_does(number):
    values = np.array([0, 1, 3], protos.NUMPY_DTYPES[number])
    theirs = tensor_pb2.TensorProto.FromString(protos.make_tensor(values).SerializeToString())
    assert theirs.dtype == number
    read = tf.make_ndarray(theirs)
    assert read.dtype == values.dtype and (read == values).all()
    # TF writes a tensor of several values as tensor_content and a single value in its typed field
    for written in (tf.make_tensor_proto(values), tf.make_tensor_proto(values[-1:])):
        got = protos.to_numpy(protos.TensorProto.FromString(written.SerializeToString()))
        assert got.dtype == values.dtype and (got == tf.make_ndarray(written)).all(), written


# -- image headers: the explain page's check against the graph's --------------------------------
# The page reads headers only: where it accepts an image the graph must read the same size from the
# header, though the graph may then find the pixels corrupt; everything else both refuse, alike.
_PAGE_REFUSALS = {HTTPStatus.BAD_REQUEST: "empty", HTTPStatus.UNSUPPORTED_MEDIA_TYPE: "unreadable",
                  HTTPStatus.REQUEST_ENTITY_TOO_LARGE: "too large"}
_GRAPH_REFUSALS = {"image_bytes: an image is empty": "empty", "image_bytes: not a JPEG": "unreadable",
                   "image_bytes: GIF images": "unreadable", "image_bytes: the image declares": "too large"}


def page_verdict(data: bytes, limit: int) -> str:
    """What the explain page makes of `data`: accepted, empty, unreadable or too large."""
    try:
        ExplainPage(client=None, limits=PageLimits(max_pixels=limit)).check(data)  # check() reads the header alone
    except PageError as err:
        return _PAGE_REFUSALS[err.status]
    return "accepted"


@functools.cache
def graph_header(limit: int):
    """The graph's header check for one limit, as a graph."""

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def check(data):
        _, _, height, width = decode.declared_size(data)
        return width, height, decode.header_error(data, limit)

    return check


def graph_verdict(data: bytes, limit: int) -> tuple[str, tuple[int, int] | None]:
    """What the graph makes of the header of `data`, and the (width, height) it read there."""
    try:
        width, height, error = graph_header(limit)(tf.constant(data))
    except tf.errors.InvalidArgumentError:  # libjpeg could not read the header (extract_jpeg_shape)
        return "unreadable", None
    error = error.numpy().decode()
    kinds = [kind for start, kind in _GRAPH_REFUSALS.items() if error.startswith(start)]
    assert len(kinds) == (1 if error else 0), error
    return (kinds[0] if kinds else "accepted"), (int(width), int(height))


def disagreements(cases: dict[str, tuple[bytes, bool]], limit: int) -> tuple[list[str], set[str]]:
    """Where page and graph differ on `cases` (name: (encoded image, intact?)), and the verdicts seen."""
    _, errors = decode.decode_images(tf.constant([data for data, _ in cases.values()]), (8, 8), limit)
    found, seen = [], set()
    for (name, (data, intact)), decoded in zip(cases.items(), errors.numpy()):
        page, (graph, graph_size), error = page_verdict(data, limit), graph_verdict(data, limit), decoded.decode()
        seen.add(page)
        if page == "accepted":  # the same size; intact images decode
            agree = graph == "accepted" and graph_size == declared_size(data) and error in ("", decode.UNDECODABLE)
            agree = agree and not (intact and error)
        elif page == "unreadable" and graph == "accepted":
            agree = error == decode.UNDECODABLE  # e.g. a PNG cut before its size: the graph's decoder refuses it
        else:
            agree = page == graph and error != ""
            if page == "too large":
                agree = agree and graph_size == declared_size(data) and "{}x{} pixels".format(*graph_size) in error
        if not agree:
            found.append(f"{name}: page {page}, graph {graph} {graph_size} then {error!r}")
    return found, seen


def _real_images() -> dict[str, bytes]:
    """Every format the page or the graph might meet, W x H, from the encoders people use."""
    rgb = random_images(1, max(W, H))[0][:H, :W]
    progressive = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    top_down = bytearray(encode(".bmp", rgb))
    top_down[22:26] = struct.pack("<i", -H)
    return {"PNG": encode(".png", rgb), "gray PNG": encode(".png", rgb[..., 0]),
            "RGBA PNG": encode(".png", rgb[..., [0, 1, 2, 0]]),
            "16-bit PNG": encode(".png", rgb.astype(np.uint16) * 257),
            "JPEG": encode(".jpg", rgb), "gray JPEG": encode(".jpg", rgb[..., 0]), "progressive JPEG": progressive,
            "BMP": encode(".bmp", rgb), "top-down BMP": bytes(top_down), "GIF": gif(rgb), "WebP": encode(".webp", rgb)}


def test_real_images_and_their_truncations():
    cases = {}
    for name, data in _real_images().items():
        cases[name] = data, True
        cut = {*range(40), *range(40, len(data), 37), len(data) - 1}
        if "JPEG" in name:  # its header ends with its first scan's
            scan = data.index(b"\xff\xda")
            cut.update(range(scan - 2, scan + 16))
        cases.update({f"{name} cut to {n} bytes": (data[:n], False) for n in sorted(cut)})
    found, seen = disagreements(cases, DEFAULT_MAX_PIXELS)
    assert not found, "\n".join(found)
    assert seen == {"accepted", "empty", "unreadable"}


_PNG = encode(".png", random_images(1, 8)[0])


def _forged_png(width: int, height: int) -> bytes:
    return _PNG[:16] + struct.pack(">II", width, height) + _PNG[24:]


@pytest.mark.parametrize("side", [W * H - 1, W * H, W * H + 1])
def test_real_images_at_the_limit(side):
    cases = {name: (data, True) for name, data in _real_images().items() if "GIF" not in name and "WebP" not in name}
    found, seen = disagreements(cases, limit=side)
    assert not found, "\n".join(found)
    assert seen == {"accepted" if side >= W * H else "too large"}


def test_headers_at_the_default_limit():
    below, at, above = (4999, 5001), (5000, 5000), (4901, 5101)  # 25 million pixels -1, 0, +1
    assert [w * h - DEFAULT_MAX_PIXELS for w, h in (below, at, above)] == [-1, 0, 1]
    cases = {"a real 5000x5000 PNG": (png_bomb(5000), True)}
    for width, height in (below, at, above, (1, DEFAULT_MAX_PIXELS), (1, DEFAULT_MAX_PIXELS + 1)):
        cases[f"PNG claiming {width}x{height}"] = _forged_png(width, height), False
        cases[f"BMP claiming {width}x{height}"] = bmp_claiming(width, height), False
        cases[f"top-down BMP claiming {width}x{height}"] = bmp_claiming(width, -height), False
        if max(width, height) < 2**16:
            cases[f"JPEG claiming {width}x{height}"] = jpeg_claiming(width, height), False
    found, seen = disagreements(cases, DEFAULT_MAX_PIXELS)
    assert not found, "\n".join(found)
    assert seen == {"accepted", "too large"}


def _jpeg_segments(data: bytes) -> list[bytes]:
    """A JPEG cut into SOI, its header's segments up to the first scan, and the rest."""
    parts, at = [data[:2]], 2
    while data[at + 1] != 0xDA:
        end = at + 2 + struct.unpack(">H", data[at + 2:at + 4])[0]
        parts.append(data[at:end])
        at = end
    return [*parts, data[at:]]


def test_corrupt_headers():
    jpeg = _jpeg_segments(encode(".jpg", random_images(1, 16)[0]))
    frame = next(i for i, part in enumerate(jpeg) if part[1] == 0xC0)
    bmp = encode(".bmp", random_images(1, 16)[0])
    cases = {
        "nothing": b"", "text": b"<html>not an image</html>", "BM alone": b"BM", "PNG signature alone": _PNG[:8],
        "BMP with a negative width": bmp[:18] + struct.pack("<i", -16) + bmp[22:],
        "BMP with a zero width": bmp[:18] + struct.pack("<i", 0) + bmp[22:],
        "BMP claiming -2^31 rows": bmp_claiming(1, -2**31),
        "PNG claiming (2^32-1)^2 pixels": _forged_png(2**32 - 1, 2**32 - 1),
        "PNG claiming 0 pixels": _forged_png(0, 2**31 - 1),
        "JPEG claiming 0 rows (DNL)": jpeg_claiming(16, 0), "JPEG claiming 0 columns": jpeg_claiming(0, 16),
        "JPEG claiming 65535x65535": jpeg_claiming(65535, 65535),
        "JPEG claiming 65500x1": jpeg_claiming(65500, 1), "JPEG claiming 1x65501": jpeg_claiming(1, 65501),
        "JPEG with a stray byte after SOI": jpeg[0] + b"\0" + b"".join(jpeg[1:]),
        "JPEG with stray bytes before a marker": b"".join(jpeg[:2]) + b"\x12\x34" + b"".join(jpeg[2:]),
        "JPEG with fill bytes before a marker": b"".join(jpeg[:2]) + b"\xff\xff\xff" + b"".join(jpeg[2:]),
        "JPEG with a stuffed 0xFF00 before a marker": b"".join(jpeg[:2]) + b"\xff\x00" + b"".join(jpeg[2:]),
        "JPEG with two frame headers": b"".join([*jpeg[:frame + 1], jpeg[frame], *jpeg[frame + 1:]]),
        "JPEG ending before its scan": b"".join(jpeg[:-1]) + b"\xff\xd9",
        "JPEG with its scan before its frame": b"".join([*jpeg[:frame], jpeg[-1]]),
        "JPEG with a short frame header": b"".join([*jpeg[:frame], jpeg[frame][:2] + b"\0\7" + jpeg[frame][4:9],
                                                     *jpeg[frame + 1:]]),
    }
    for marker in range(0xC0, 0xD0):  # every frame kind, and the DHT / DAC markers among them
        cases[f"JPEG with marker {marker:X} for its frame"] = b"".join(
            [*jpeg[:frame], jpeg[frame][:1] + bytes([marker]) + jpeg[frame][2:], *jpeg[frame + 1:]])
    found, seen = disagreements({name: (data, False) for name, data in cases.items()}, DEFAULT_MAX_PIXELS)
    assert not found, "\n".join(found)
    assert seen == {"accepted", "empty", "unreadable", "too large"}
