"""TensorProto <-> numpy for the server: requests decoded with TF Serving's checks (and caps on
what a few bytes may ask for), responses written in TF Serving's default form."""

from __future__ import annotations

import math
from typing import Iterable

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from .errors import ServingError

# TF's TensorProto shorthand: fewer values than the shape holds repeats the last one (none: zeros).
# A few bytes on the wire could then ask for gigabytes, so the expansion is capped.
MAX_FILL_BYTES = 64 * 2**20
_VALUE_FIELDS = ("half_val", "float_val", "double_val", "int_val", "string_val", "scomplex_val", "int64_val",
                 "bool_val", "dcomplex_val", "resource_handle_val", "variant_val", "uint32_val", "uint64_val")


def _shape_text(shape: Iterable[int | None]) -> str:
    return "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"


def dtype_name(enum: int) -> str:
    try:
        return tf.dtypes.as_dtype(enum).name
    except TypeError:
        return types_pb2.DataType.Name(enum) if enum in types_pb2.DataType.values() else f"invalid dtype {enum}"


def decode_tensor(name: str, proto: tensor_pb2.TensorProto, max_bytes: int) -> np.ndarray:
    """A request TensorProto as a numpy array, refusing malformed or oversized tensors."""
    if proto.tensor_shape.unknown_rank:
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': the tensor has no shape")
    dims = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in dims):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': negative dimension in shape {dims}")
    count = math.prod(dims)
    dtype = tf.dtypes.as_dtype(proto.dtype)
    if dtype != tf.string:
        nbytes = count * dtype.size
        if nbytes > max_bytes:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"input '{name}': shape {_shape_text(dims)} is {nbytes} bytes, more than the {max_bytes} allowed",
            )
        sent = sum(len(getattr(proto, field)) for field in _VALUE_FIELDS if hasattr(proto, field))
        if not proto.tensor_content and sent < count and nbytes > MAX_FILL_BYTES:
            raise ServingError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"input '{name}': shape {_shape_text(dims)} holds {count} values ({nbytes} bytes) but the request "
                f"carries {sent}; filling a tensor from fewer values is allowed up to {MAX_FILL_BYTES} bytes",
            )
        if proto.tensor_content and len(proto.tensor_content) != nbytes:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input '{name}': tensor_content has {len(proto.tensor_content)} bytes; "
                f"shape {_shape_text(dims)} of {dtype.name} needs {nbytes}",
            )
    elif len(proto.string_val) != count:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"input '{name}': {len(proto.string_val)} strings for shape {_shape_text(dims)}",
        )
    try:
        array = tf.make_ndarray(proto)
    except Exception as e:  # malformed content: tell the client, do not crash
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"input '{name}': cannot decode the tensor: {e}") from None
    return array


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


# Packed repeated fields of TensorProto whose wire bytes are the little-endian array itself.
_RAW_FIELDS = {np.dtype(np.float32): (5, "<f4"), np.dtype(np.float64): (6, "<f8")}
_LIST_FIELDS = {
    np.dtype(np.int8): "int_val", np.dtype(np.int16): "int_val", np.dtype(np.int32): "int_val",
    np.dtype(np.uint8): "int_val", np.dtype(np.uint16): "int_val", np.dtype(np.int64): "int64_val",
    np.dtype(np.uint32): "uint32_val", np.dtype(np.uint64): "uint64_val", np.dtype(np.bool_): "bool_val",
}


def encode_tensor(array: np.ndarray, as_tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """A response TensorProto the way TF Serving writes it.

    TF Serving's default (`--enable_serialization_as_tensor_content=false`) puts values in the typed
    repeated fields (`float_val`, `int_val`, `string_val`...), not `tensor_content`; clients must
    read both, and answering the same way here keeps a client that reads only one form honest.
    """
    array = np.asarray(array)
    if as_tensor_content or array.dtype.kind in "OSU" or array.dtype not in (*_RAW_FIELDS, *_LIST_FIELDS):
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(dtype=tf.dtypes.as_dtype(array.dtype).as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    if array.size == 0:
        return proto
    if array.dtype in _RAW_FIELDS:
        number, little_endian = _RAW_FIELDS[array.dtype]
        data = np.ascontiguousarray(array, dtype=little_endian).tobytes()
        proto.MergeFromString(_varint(number << 3 | 2) + _varint(len(data)) + data)
    else:
        getattr(proto, _LIST_FIELDS[array.dtype]).extend(array.ravel().tolist())
    return proto
