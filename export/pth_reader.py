"""Read a PyTorch state dict saved in the legacy (pre-1.6, non-zip) format, without torch.

Such a file is five things one after the other: three small pickles (a magic number, the protocol
version, the machine's type sizes), the state dict's pickle, whose tensors refer to storages by key,
a pickle of the storage keys, and then each storage's raw bytes, preceded by its element count
(8 bytes, little-endian), in that order.

Unpickling runs code: a pickle names functions and the unpickler calls them. So only the globals a
state dict needs are let in (`OrderedDict`, the tensor rebuilder, the storage types, which here
only say the element type), and anything else is refused before it is called.

A tensor is a strided view of its storage (weights converted from TensorFlow's HWIO are permuted
views): the view is taken with its strides, never by reshaping the raw bytes.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
from typing import IO, Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
STORAGE_TYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file asks the unpickler for something a state dict never needs."""


@dataclasses.dataclass
class _Storage:
    dtype: np.dtype
    size: int
    data: np.ndarray | None = None  # filled once the raw bytes after the pickles are read


@dataclasses.dataclass
class _TensorView:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def array(self) -> np.ndarray:
        """The tensor's values, read with its strides; the view is checked to lie inside its storage
        first (shape, offset and strides come from the file: they must not reach other memory)."""
        numbers = (self.offset, *self.shape, *self.stride)
        if len(self.shape) != len(self.stride) or not all(isinstance(n, int) and n >= 0 for n in numbers):
            raise ValueError(f"a tensor has shape {self.shape}, strides {self.stride}, offset {self.offset}")
        if 0 in self.shape:
            return np.zeros(self.shape, self.storage.dtype)
        end = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride)) + 1
        if end > self.storage.size:
            raise ValueError(f"a tensor of shape {self.shape} reaches past its storage of {self.storage.size} elements")
        base = self.storage.data[self.offset:end]
        view = np.lib.stride_tricks.as_strided(
            base, shape=self.shape, strides=[s * base.itemsize for s in self.stride], writeable=False
        )
        return np.ascontiguousarray(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *_requires_grad_and_hooks) -> _TensorView:
    return _TensorView(storage, int(storage_offset), tuple(size), tuple(stride))


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor")):
            return _rebuild_tensor
        if module == "torch" and name in STORAGE_TYPES:
            return np.dtype(STORAGE_TYPES[name])
        raise UnsafeCheckpointError(
            f"refused to load {module}.{name}: a PyTorch state dict needs only tensors and OrderedDict, "
            "so this file is not one (or it would run code while loading)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"unexpected persistent id {pid!r}: not a legacy PyTorch storage")
        _, dtype, key, _location, size, view = pid
        if not isinstance(dtype, np.dtype):
            raise UnsafeCheckpointError(f"storage {key!r} has no storage type")
        if view is not None:
            raise ValueError(f"storage {key!r} is a view of another storage: not supported")
        storage = self.storages.setdefault(str(key), _Storage(dtype, int(size)))
        if storage.dtype != dtype or storage.size != size:
            raise ValueError(f"storage {key!r} is described twice, differently")
        return storage


class _PlainUnpickler(pickle.Unpickler):
    """The header pickles and the key list hold only numbers, strings, lists and dicts."""

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafeCheckpointError(f"refused to load {module}.{name} from a checkpoint header")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The state dict in `path` as numpy arrays (contiguous, in PyTorch's axis order), by key.

    Raises UnsafeCheckpointError for a file that asks for anything but tensors, ValueError for any
    other file that is not a legacy PyTorch state dict.
    """
    with open(path, "rb") as file:
        if file.read(2) == b"PK":
            raise ValueError(f"{path}: a zip checkpoint (PyTorch >= 1.6): re-save it with "
                             "_use_new_zipfile_serialization=False")
        file.seek(0)
        try:
            return _read(file, os.fstat(file.fileno()).st_size)
        except UnsafeCheckpointError:
            raise
        except Exception as error:
            raise ValueError(f"{path}: not a legacy PyTorch state dict ({type(error).__name__}: {error})") from None


def _read(file: IO[bytes], file_size: int) -> dict[str, np.ndarray]:
    if _PlainUnpickler(file).load() != MAGIC_NUMBER:
        raise ValueError("wrong magic number")
    if _PlainUnpickler(file).load() != PROTOCOL_VERSION:
        raise ValueError("unsupported protocol version")
    sys_info = _PlainUnpickler(file).load()
    if not (isinstance(sys_info, dict) and sys_info.get("little_endian") is True):
        raise ValueError("only little-endian checkpoints are supported")
    unpickler = _StateDictUnpickler(file)
    state = unpickler.load()
    if not isinstance(state, dict):
        raise ValueError(f"it holds a {type(state).__name__}, not a state dict")
    for key in _PlainUnpickler(file).load():
        storage = unpickler.storages.get(key)
        (count,) = struct.unpack("<q", file.read(8))
        if storage is None or count != storage.size:
            raise ValueError(f"storage {key!r} does not match the state dict")
        nbytes = count * storage.dtype.itemsize
        if nbytes > file_size - file.tell():  # before allocating: the count comes from the file
            raise ValueError(f"truncated (storage {key!r})")
        storage.data = np.frombuffer(file.read(nbytes), dtype=storage.dtype.newbyteorder("<"))
    missing = [key for key, storage in unpickler.storages.items() if storage.data is None]
    if missing:
        raise ValueError(f"storages {missing[:3]} have no data")
    return {name: tensor.array() for name, tensor in state.items() if isinstance(tensor, _TensorView)}
