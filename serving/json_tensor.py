"""TF Serving's REST JSON for tensors (util/json_tensor.cc): request bodies in, predictions out.

Requests come in the row format (`"instances"`: one entry per row, an object per row when the
signature has several inputs) or the columnar format (`"inputs"`: a value, or an object of named
tensors). Values are typed by the signature: an integer dtype takes JSON integers only, a float
dtype any number, a string dtype strings or `{"b64": "..."}`. Answers mirror the request:
`"predictions"` (a list of rows; the output's name is omitted when there is only one) or
`"outputs"`. A string output whose name ends in `_bytes` is written as `{"b64": ...}`, any other
string as text, exactly TF Serving's rule (`IsNamedTensorBytes`).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Mapping

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from .errors import ServingError

ROW, COLUMNAR = "instances", "inputs"
_ANSWER_KEY = {ROW: "predictions", COLUMNAR: "outputs"}
_INTEGER_KINDS, _NUMBER_KINDS = "iu", "iuf"


def _invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _excerpt(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 256 else text[:256] + "..."


def parse_body(body: bytes) -> dict:
    """The request object, or INVALID_ARGUMENT in TF Serving's words."""
    if not body.strip():
        raise _invalid("JSON Parse error: The document is empty")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise _invalid(f"JSON Parse error: {e}") from None
    if not isinstance(document, dict):
        raise _invalid(f"JSON Value: {_excerpt(document)} Is not object")
    signature = document.get("signature_name", "")
    if not isinstance(signature, str):
        raise _invalid(f"JSON Value: {_excerpt(document)} not formatted correctly. "
                       "'signature_name' key must be a string value.")
    return document


def request_format(document: dict) -> str:
    """ROW or COLUMNAR: which of "instances" and "inputs" the request holds (exactly one)."""
    if ROW in document and COLUMNAR in document:
        raise _invalid(f"JSON Value: {_excerpt(document)} Not formatted correctly expecting only one of 'inputs' "
                       "or 'instances' keys to exist")
    if ROW in document:
        rows = document[ROW]
        if not isinstance(rows, list):
            raise _invalid(f"JSON Value: {_excerpt(document)} Expecting 'instances' to be an list/array")
        if not rows:
            raise _invalid(f"JSON Value: {_excerpt(document)} No values in 'instances' array")
        return ROW
    if COLUMNAR in document:
        return COLUMNAR
    raise _invalid("Missing 'inputs' or 'instances' key")


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _string(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode()
    if _is_b64(value):
        if not isinstance(value["b64"], str):
            raise _invalid(f"JSON Value: {_excerpt(value)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise _invalid(f"Unable to base64 decode: {_excerpt(value)}") from None
    raise _invalid(f"JSON Value: {_excerpt(value)} is not of expected type: string")


def _shape(value: Any) -> list[int]:
    """The dense shape of nested lists, taken from the first element at each level (as TF Serving)."""
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def to_array(value: Any, info: meta_graph_pb2.TensorInfo, name: str) -> np.ndarray:
    """A JSON value as an array of the signature input's dtype; ragged lists and values of the wrong
    type are INVALID_ARGUMENT naming the input."""
    dtype = tf.dtypes.as_dtype(info.dtype)
    shape = _shape(value)
    if dtype == tf.string:
        flat: list[bytes] = []

        def walk(v: Any, level: int) -> None:
            if level < len(shape):
                if not isinstance(v, list) or len(v) != shape[level]:
                    raise _invalid(f"input '{name}': Encountered list at unexpected size: "
                                   f"{len(v) if isinstance(v, list) else 'a value'} at level: {level} "
                                   f"expected size: {shape[level]}")
                for item in v:
                    walk(item, level + 1)
            else:
                flat.append(_string(v))

        walk(value, 0)
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    try:
        array = np.asarray(value)
    except ValueError:  # ragged
        raise _invalid(f"input '{name}': the nested lists are ragged: every list at one level must have the "
                       f"same length as the first, which gives shape {shape}") from None
    wanted = np.dtype(dtype.as_numpy_dtype)
    kinds = _NUMBER_KINDS if wanted.kind == "f" else _INTEGER_KINDS if wanted.kind in "iu" else "b"
    if array.size == 0:  # an empty list has no type to check
        return array.astype(wanted)
    if array.dtype.kind not in kinds:
        raise _invalid(f"input '{name}': JSON Value: {_excerpt(value)} is not of expected type: {dtype.name}")
    if wanted.kind in "iu":
        info_range = np.iinfo(wanted)
        if array.min() < info_range.min or array.max() > info_range.max:
            raise _invalid(f"input '{name}': a value is out of the range of {dtype.name} "
                           f"[{info_range.min}, {info_range.max}]")
    return array.astype(wanted)


def request_arrays(
    document: dict, inputs: Mapping[str, meta_graph_pb2.TensorInfo]
) -> tuple[str, dict[str, np.ndarray]]:
    """The request format and one array per signature input, from a parsed request body."""
    form = request_format(document)
    names = sorted(inputs)
    if form == COLUMNAR:
        given = document[COLUMNAR]
        if not isinstance(given, dict) or _is_b64(given):
            if len(names) != 1:
                raise _invalid(
                    "inputs is a plain value/list, but expecting an object as multiple input tensors "
                    "required as per tensorinfo_map"
                )
            given = {names[0]: given}
        missing = [n for n in names if n not in given]
        if missing:
            raise _invalid(f"Missing named input: {missing[0]} in 'inputs' object.")
        return form, {n: to_array(given[n], inputs[n], n) for n in names}
    rows = document[ROW]
    if all(isinstance(r, dict) and not _is_b64(r) for r in rows):
        columns: dict[str, list] = {n: [] for n in names}
        for i, row in enumerate(rows):
            if set(row) != set(names):
                raise _invalid(
                    f"Failed to process element: {i} of 'instances' list. JSON object: {_excerpt(row)} "
                    f"keys must be equal to: {','.join(names)}"
                )
            for n in names:
                columns[n].append(row[n])
    elif any(isinstance(r, dict) and not _is_b64(r) for r in rows):
        raise _invalid("'instances' mixes objects and values: give every row as an object or every row as a value")
    elif len(names) != 1:
        raise _invalid(
            "instances is a plain list, but expecting list of objects as multiple input tensors "
            "required as per tensorinfo_map"
        )
    else:
        columns = {names[0]: rows}
    return form, {n: to_array(columns[n], inputs[n], n) for n in names}


def _text(array: np.ndarray, as_b64: bool) -> list[str]:
    """Every element of an array as JSON text, in order (floats as the shortest text that reads back
    to the same value, like TF Serving; NaN and infinities as its NaN / Infinity / -Infinity)."""
    flat = array.ravel()
    if array.dtype.kind in "OSU":
        if as_b64:
            return ['{"b64": "%s"}' % base64.b64encode(bytes(v)).decode() for v in flat]
        return [json.dumps(v.decode(errors="replace") if isinstance(v, bytes) else str(v)) for v in flat]
    if array.dtype.kind == "f":

        def number(v) -> str:
            if math.isfinite(v):
                text = str(v)
                return text if "." in text or "e" in text else text + ".0"
            return "NaN" if math.isnan(v) else "Infinity" if v > 0 else "-Infinity"

        return [number(v) for v in flat]
    if array.dtype.kind == "b":
        return ["true" if v else "false" for v in flat]
    return [str(int(v)) for v in flat.tolist()]


def _nest(texts: list[str], shape: tuple[int, ...]) -> str:
    if not shape:
        return texts[0]
    if len(shape) == 1:
        return "[" + ", ".join(texts) + "]"
    step = len(texts) // shape[0] if shape[0] else 0
    return "[" + ", ".join(_nest(texts[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])) + "]"


def answer_json(outputs: Mapping[str, np.ndarray], form: str) -> str:
    """The response body for the request format: "predictions" (rows) or "outputs" (columns)."""
    names = sorted(outputs)
    texts = {n: _text(np.asarray(outputs[n]), n.endswith("_bytes")) for n in names}
    shapes = {n: np.shape(outputs[n]) for n in names}
    if form == COLUMNAR:
        if len(names) == 1:
            body = _nest(texts[names[0]], shapes[names[0]])
        else:
            body = "{" + ", ".join(f"{json.dumps(n)}: {_nest(texts[n], shapes[n])}" for n in names) + "}"
        return '{"outputs": ' + body + "}"
    sizes = {n: shapes[n][0] if shapes[n] else None for n in names}
    for n in names:
        if sizes[n] is None:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Tensor name: {n} has no shape information ")
        if sizes[n] != sizes[names[0]]:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Tensor name: {n} has inconsistent batch size: {sizes[n]} expecting: {sizes[names[0]]}",
            )
    rows = []
    for i in range(sizes[names[0]] if names else 0):

        def row(n: str) -> str:
            step = len(texts[n]) // sizes[n]
            return _nest(texts[n][i * step : (i + 1) * step], shapes[n][1:])

        rows.append(
            row(names[0]) if len(names) == 1 else "{" + ", ".join(f"{json.dumps(n)}: {row(n)}" for n in names) + "}"
        )
    return '{"predictions": [' + ", ".join(rows) + "]}"
