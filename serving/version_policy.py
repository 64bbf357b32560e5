"""Which versions on disk a model's version policy wants loaded, and their states, as TF Serving reports them."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grpc
from tensorflow_serving.config import model_server_config_pb2


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
