"""The models a server holds: TF Serving's model manager for the embedded server.

Every model of a `ModelServerConfig` is a base path whose numeric subdirectories are versions
(servables/versions.py); its version policy (version_policy.py: latest N by default, all, or specific) says which are
loaded (serving/signatures.py); a poll thread picks up new versions and drops old ones, keeping the
newest old version until a new one is loaded.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import Callable

import grpc
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.config import model_server_config_pb2

from .errors import ServingError, clean_tf_message, error_code
from .servables.versions import disk_state, has_saved_model, numeric_versions
from .signatures import ModelVersion
from .version_policy import VersionState, aspired_versions

log = logging.getLogger("serving.registry")

MAX_LOAD_ATTEMPTS = 5  # like TF Serving's --max_num_load_retries


class _Model:
    def __init__(self, config: model_server_config_pb2.ModelConfig):
        self.config = config
        self.versions: dict[int, ModelVersion] = {}  # replaced, never mutated: readers need no lock
        self.states: dict[int, VersionState] = {}  # every version this server has seen, as reported
        self.failures: collections.Counter[int] = collections.Counter()
        self.failed_state: dict[int, tuple] = {}  # what the directory held at the last failed load
        self.incomplete: set[int] = set()  # directories without saved_model.pb (logged once)
        self.warned_empty = False


class ModelRegistry:
    """The models of a ModelServerConfig and their loaded versions, with TF Serving's version states."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig, warmup: bool = True,
                 max_bytes: int = 2**31 - 1, on_load: Callable[[str, bool], None] | None = None,
                 session_config: bytes = b""):
        _check_config(config)
        self._models = {m.name: _Model(m) for m in config.model_config_list.config}  # replaced on reload
        self._warmup = warmup
        self._session_config = session_config  # a serialized tensorflow.ConfigProto for every version's session
        self._max_bytes = max_bytes
        self._on_load = on_load  # told of every load attempt: (path, succeeded), for metrics
        self._retired: dict[str, dict[int, VersionState]] = {}  # states of models a reload removed
        self._sync_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    def sync(self) -> list[str]:
        """Load the versions the policies want and that are not loaded yet; unload the others.

        Returns the loads that failed in this pass ("model M version V: cause").
        """
        with self._sync_lock:
            return [error for name, model in self._models.items() for error in self._sync_model(name, model)]

    def reload(self, config: model_server_config_pb2.ModelServerConfig) -> list[str]:
        """Serve exactly the models of `config` (TF Serving's ReloadConfig): new models are loaded,
        models no longer listed are unloaded, a changed base path or policy takes effect.
        Returns the loads that failed, as `sync`."""
        _check_config(config)
        with self._sync_lock:
            models = {}
            for new in config.model_config_list.config:
                model = self._models.get(new.name)
                if model is None or model.config.base_path != new.base_path:
                    # TF Serving's state monitor never forgets a version: neither do we.
                    seen = model.states if model is not None else self._retired.pop(new.name, {})
                    model = _Model(new)
                    model.states = dict(seen)
                model.config = new
                models[new.name] = model
            # Load first, then publish: a model keeps being served until its replacement is loaded.
            errors = [error for name, model in models.items() for error in self._sync_model(name, model)]
            for name, model in self._models.items():
                if models.get(name) is not model:
                    self._unload_all(name, model)
                    if name not in models:
                        self._retired[name] = model.states
            self._models = models
            return errors

    @staticmethod
    def _set_state(model: _Model, version: int, state: VersionState) -> None:
        model.states = {**model.states, version: state}

    def all_states(self) -> list[tuple[str, int, str]]:
        """(model, version, state) of every version known: the metrics' view."""
        return [(name, version, state.state) for name, model in self._models.items()
                for version, state in sorted(model.states.items())]

    def _unload(self, name: str, model: _Model, version: int) -> None:
        self._set_state(model, version, VersionState("UNLOADING"))
        model.versions = {v: loaded for v, loaded in model.versions.items() if v != version}
        self._set_state(model, version, VersionState("END"))
        log.info("unloaded model %s version %d", name, version)

    def _unload_all(self, name: str, model: _Model) -> None:
        for version in sorted(model.versions):
            self._unload(name, model, version)

    def _sync_model(self, name: str, model: _Model) -> list[str]:
        base_path = model.config.base_path
        on_disk = numeric_versions(base_path)
        wanted = aspired_versions(model.config, list(on_disk))
        if not wanted and not model.versions and not model.warned_empty:
            log.warning("No versions of servable %s found under base path %s", name, base_path)
            model.warned_empty = True
        errors = []
        for version in wanted:
            if version in model.versions:
                continue
            path = os.path.join(base_path, on_disk[version])
            if not has_saved_model(path):  # being written, or not a SavedModel: look again next poll
                if version not in model.incomplete:
                    model.incomplete.add(version)
                    log.warning("model %s version %d: %s has no saved_model.pb (still being written?): not loaded",
                                name, version, path)
                continue
            if model.failures[version] >= MAX_LOAD_ATTEMPTS:
                if model.failed_state.get(version) == disk_state(path):
                    continue
                log.info("model %s version %d changed on disk since it failed to load: trying again", name, version)
                model.failures[version] = 0
            started = time.perf_counter()
            self._set_state(model, version, VersionState("LOADING"))
            try:
                loaded = ModelVersion.load(name, version, path, self._session_config)
                warmed = loaded.warm_up(self._max_bytes) if self._warmup else 0
            except Exception as e:
                model.failures[version] += 1
                model.failed_state[version] = disk_state(path)
                if self._on_load is not None:
                    self._on_load(path, False)
                message = clean_tf_message(str(e))[:500]
                self._set_state(model, version, VersionState("END", error_code(e), message))
                serving = sorted(model.versions)
                log.error("failed to load model %s version %d from %s (attempt %d of %d; %s): %s",
                          name, version, path, model.failures[version], MAX_LOAD_ATTEMPTS,
                          f"still serving version {serving[-1]}" if serving else "no version is served", message)
                errors.append(f"model {name} version {version}: {message}")
                continue
            model.versions = {**model.versions, version: loaded}
            if self._on_load is not None:
                self._on_load(path, True)
            self._set_state(model, version, VersionState("AVAILABLE"))
            model.warned_empty = False
            log.info("loaded model %s version %d from %s in %.1f s (signatures: %s; %d warm-up requests)",
                     name, version, path, time.perf_counter() - started, ", ".join(loaded.signatures), warmed)
        # Unload what is no longer wanted, but keep serving the newest old version until a wanted
        # one is loaded (TF Serving's availability-preserving policy).
        stale = sorted(v for v in model.versions if v not in wanted)
        if stale and not any(v in model.versions for v in wanted):
            stale = stale[:-1]
        for version in stale:
            self._unload(name, model, version)
        return errors

    def start_polling(self, interval_seconds: float) -> None:
        """Look for new versions every `interval_seconds` (TF Serving's file system poll)."""
        if interval_seconds <= 0:
            return

        def poll() -> None:
            while not self._stop.wait(interval_seconds):
                try:
                    self.sync()
                except Exception:  # keep polling whatever happens to one pass
                    log.exception("polling the model base paths failed")

        self._poller = threading.Thread(target=poll, name="version-poller", daemon=True)
        self._poller.start()

    def stop(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(timeout=5)

    def _lookup(self, spec: model_pb2.ModelSpec) -> tuple[_Model | None, int | None]:
        """The model a ModelSpec names (None if unknown) and the version it asks for (None: latest)."""
        model = self._models.get(spec.name)
        if model is None:
            return None, None
        if spec.HasField("version"):
            return model, spec.version.value
        if spec.version_label:
            labels = model.config.version_labels
            if spec.version_label not in labels:
                raise ServingError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {spec.version_label}"
                )
            return model, labels[spec.version_label]
        return model, None

    def resolve(self, spec: model_pb2.ModelSpec) -> ModelVersion:
        """The loaded version a request's ModelSpec names (latest when none), or NOT_FOUND."""
        model, version = self._lookup(spec)
        versions = model.versions if model is not None else {}
        if version is None:
            if not versions:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({spec.name})")
            return versions[max(versions)]
        if version not in versions:
            raise ServingError(
                grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Specific({spec.name}, {version})"
            )
        return versions[version]

    def states(self, spec: model_pb2.ModelSpec) -> list[tuple[int, VersionState]]:
        """Every version of a model this server knows, newest first (one if the spec names it),
        with its state: GetModelStatus."""
        model, version = self._lookup(spec)
        states = model.states if model is not None else self._retired.get(spec.name, {})
        if version is None:
            if not states:
                raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {spec.name}")
            return sorted(states.items(), reverse=True)
        if version not in states:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {spec.name}")
        return [(version, states[version])]


def _check_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """Refuse what TF Serving refuses in a ModelServerConfig before anything is loaded."""
    if config.WhichOneof("config") == "custom_model_config":
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT, "only model_config_list is supported (no custom_model_config)"
        )
    names = [m.name for m in config.model_config_list.config]
    for m in config.model_config_list.config:
        if not m.name or not m.base_path:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"model config {m.name or '(no name)'}: name and base_path are required",
            )
        if names.count(m.name) > 1:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Illegal to list model {m.name} multiple times in config list"
            )
