"""Versions on disk and which of them a model's version policy wants, as TF Serving sees them."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import grpc
from tensorflow_serving.config import model_server_config_pb2


def numeric_versions(base_path: str) -> dict[int, str]:
    """Version number -> directory name of the numeric subdirectories of a base path.

    As TF Serving's file system source: a name made of digits is a version, leading zeros
    included ("00000123" is version 123); other names are ignored.
    """
    try:
        entries = os.listdir(base_path)
    except OSError:
        return {}
    found = {int(e): e for e in sorted(entries)
             if e.isascii() and e.isdigit() and os.path.isdir(os.path.join(base_path, e))}
    return dict(sorted(found.items()))


def has_saved_model(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt"))


def disk_state(path: str) -> tuple:
    """What a version directory holds (names, sizes, modification times): a failed load is retried
    only once this changes, e.g. when a half-written copy completes."""
    state = []
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue
            state.append((os.path.relpath(os.path.join(root, name), path), info.st_size, info.st_mtime_ns))
    return tuple(sorted(state))


def aspired_versions(config: model_server_config_pb2.ModelConfig, on_disk: Sequence[int]) -> list[int]:
    """The versions the model's version policy wants loaded (default: the latest one)."""
    policy = config.model_version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return list(on_disk)
    if kind == "specific":
        return [v for v in on_disk if v in set(policy.specific.versions)]
    count = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions > 0 else 1
    return list(on_disk)[-count:]


@dataclasses.dataclass(frozen=True)
class VersionState:
    """A version's state as GetModelStatus reports it (TF Serving's ModelVersionStatus)."""

    state: str  # LOADING, AVAILABLE, UNLOADING, END (TF Serving's names)
    code: grpc.StatusCode = grpc.StatusCode.OK  # a failed load: its error, with state END
    message: str = ""
