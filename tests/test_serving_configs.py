"""The TF Serving config files parse as TF Serving parses them, and the launch command is valid.

The pip package tensorflow-serving-api ships ModelServerConfig but not BatchingParameters or
MonitoringConfig; `serving.configs` declares those two with TF Serving's field names and numbers.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest
from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from camserve.serving import configs, tfserving
from camserve.serving.__main__ import options_from_args
from camserve.serving.__main__ import parser as embedded_parser
from camserve.serving.gpu import tensorflow_gpus
from camserve.serving.servables.session_config import read as read_session_config
from tf_serving_flags import EMBEDDED_ONLY_FLAGS, TF_SERVING_FLAGS, flags_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVING = ROOT / "serving"

def _parse(path: pathlib.Path, message):
    return text_format.Parse(path.read_text(), message)


def test_models_config_parses_as_model_server_config():
    config = _parse(SERVING / "models.config", model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    expected = ("efficientnet_lite0_cam", "/models/efficientnet_lite0_cam", "tensorflow")
    assert (model.name, model.base_path, model.model_platform) == expected
    assert model.model_version_policy.latest.num_versions == 1
    assert configs.read_model_server_config(SERVING / "models.config") == config


def test_batching_config_matches_the_warmup_records():
    from camserve.export.options import ExportOptions

    params = _parse(SERVING / "batching.config", configs.BatchingParameters())
    warmup_sizes = ExportOptions(backbone="any", model_name="any").warmup_batch_sizes
    assert list(params.allowed_batch_sizes) == sorted(warmup_sizes)
    assert params.allowed_batch_sizes[-1] == params.max_batch_size.value
    for field in ("max_batch_size", "batch_timeout_micros", "num_batch_threads", "max_enqueued_batches"):
        assert params.HasField(field), f"batching.config should set {field}"
    options = configs.read_batching_parameters(SERVING / "batching.config")
    assert options.allowed_batch_sizes == tuple(warmup_sizes) and options.max_batch_size == max(warmup_sizes)


CPU_ONLY_OFF = ("layout_optimizer", "constant_folding", "arithmetic_optimization", "dependency_optimization")


@pytest.mark.parametrize("name, off", [("session.config", ()), ("session_cpu.config", CPU_ONLY_OFF)])
def test_session_configs_keep_the_passes_that_make_the_served_graph_fast(name, off):
    """Both configs keep function inlining, the implementation selector (cuDNN's RNN kernels) and op
    fusion (remapper: with bfloat16, a convolution's bias and activation in float32 before one
    rounding); the GPU's also keeps constant folding, arithmetic simplification, the dependency
    optimizer and the layout optimizer (NCHW for cuDNN), which the CPU's leaves out (their build time,
    no gain at run time on a CPU: docs/BENCHMARKS.md "Start-up and export")."""
    from tensorflow.core.protobuf import rewriter_config_pb2

    options = read_session_config(SERVING / name).graph_options.rewrite_options
    for field in ("function_optimization", "implementation_selector", "remapping", *CPU_ONLY_OFF):
        assert (getattr(options, field) == rewriter_config_pb2.RewriterConfig.OFF) == (field in off), field
    assert not options.disable_meta_optimizer and options.disable_tfg_optimizer
    assert options.meta_optimizer_iterations == rewriter_config_pb2.RewriterConfig.ONE


def test_monitoring_config_enables_prometheus():
    config = _parse(SERVING / "monitoring.config", configs.MonitoringConfig())
    assert config.prometheus_config.enable
    assert config.prometheus_config.path.startswith("/")


@pytest.mark.parametrize("text, error", [
    ("max_batch_siz { value: 8 }", "no field named"),
    ("max_batch_size: 8", "max_batch_size"),  # a wrapper message, not a scalar
    ("max_batch_size { value: 8 } allowed_batch_sizes: 1 allowed_batch_sizes: 4", "must match max_batch_size"),
    ("max_batch_size { value: 8 } allowed_batch_sizes: 8 allowed_batch_sizes: 1", "increasing"),
    ("num_batch_threads { value: 0 }", "num_batch_threads"),
])
def test_bad_batching_configs_are_refused(tmp_path, text, error):
    path = tmp_path / "batching.config"
    path.write_text(text)
    with pytest.raises(ValueError, match=error):
        configs.read_batching_parameters(path)


def test_bad_model_configs_are_refused(tmp_path):
    path = tmp_path / "models.config"
    path.write_text('model_config_list { config { name: "a" base_pth: "/m" } }')
    with pytest.raises(ValueError, match="base_pth"):
        configs.read_model_server_config(path)
    path.write_text('model_config_list { config { name: "a" base_path: "/m" } config { name: "a" base_path: "/n" } }')
    with pytest.raises(ValueError, match="twice"):
        configs.read_model_server_config(path)


def _dry_run(capsys, *args: str) -> list[str]:
    assert tfserving.main(["--dry-run", *args]) == 0
    return shlex.split(capsys.readouterr().out.strip())


REQUIRED = {"port", "rest_api_port", "model_config_file", "enable_batching", "batching_parameters_file",
            "monitoring_config_file", "tensorflow_session_config_file", "enable_model_warmup"}
CONFIG_FILES = ("models.config", "batching.config", "monitoring.config", "session.config", "session_cpu.config")


def test_binary_command(capsys, tmp_path):
    argv = _dry_run(capsys, "--runtime", "binary", "--base-path", str(tmp_path), "--port", "9100", "--xla",
                    "--gpu-memory-fraction", "0.5")
    assert argv[0] == "tensorflow_model_server"
    flags = flags_of(argv[1:])
    assert set(flags) <= TF_SERVING_FLAGS
    assert REQUIRED <= set(flags)
    assert flags["port"] == "9100" and flags["rest_api_port"] == "8501" and flags["enable_batching"] == "true"
    assert flags["xla_cpu_compilation_enabled"] == "true" and flags["per_process_gpu_memory_fraction"] == "0.5"
    # the files it names exist and parse; /models in models.config became the local base path
    local = configs.read_model_server_config(flags["model_config_file"])
    assert local.model_config_list.config[0].base_path == str(tmp_path.resolve() / "efficientnet_lite0_cam")
    configs.read_batching_parameters(flags["batching_parameters_file"])
    configs.read_text_proto(flags["monitoring_config_file"], configs.MonitoringConfig)
    assert flags["tensorflow_session_config_file"] == str(SERVING / "session_cpu.config")  # the binary: a CPU's


def test_docker_command(capsys, tmp_path):
    argv = _dry_run(capsys, "--runtime", "docker", "--base-path", str(tmp_path))
    image = argv.index(tfserving.IMAGE)
    docker, server = argv[:image], argv[image + 1:]
    assert docker[:3] == ["docker", "run", "--rm"]
    assert docker[docker.index("--gpus") + 1] == "all"
    assert docker[docker.index("--entrypoint") + 1] == "tensorflow_model_server"
    mounts = [docker[i + 1] for i, arg in enumerate(docker) if arg == "-v"]
    assert f"{tmp_path.resolve()}:/models:ro" in mounts and f"{SERVING}:/config:ro" in mounts
    ports = [docker[i + 1] for i, arg in enumerate(docker) if arg == "-p"]
    assert ports == ["8500:8500", "8501:8501"]
    flags = flags_of(server)
    assert set(flags) <= TF_SERVING_FLAGS and REQUIRED <= set(flags)
    for name in ("model_config_file", "batching_parameters_file", "monitoring_config_file",
                 "tensorflow_session_config_file"):
        inside = pathlib.PurePosixPath(flags[name])
        assert inside.parent == pathlib.PurePosixPath("/config") and (SERVING / inside.name).is_file()
    assert tfserving.IMAGE == "tensorflow/serving:2.21.0-gpu"


def test_a_broken_config_stops_the_launch(capsys, tmp_path):
    for name in CONFIG_FILES:
        shutil.copy(SERVING / name, tmp_path / name)
    (tmp_path / "batching.config").write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 4\n")
    assert tfserving.main(["--dry-run", "--runtime", "docker", "--config-dir", str(tmp_path)]) == 2
    assert "must match max_batch_size" in capsys.readouterr().err
    shutil.copy(SERVING / "batching.config", tmp_path / "batching.config")
    (tmp_path / "session.config").write_text("graph_options { rewrite_options { meta_optimizer_iterations: TWICE } }")
    assert tfserving.main(["--dry-run", "--runtime", "docker", "--config-dir", str(tmp_path)]) == 2
    assert "session.config: not a valid tensorflow.ConfigProto" in capsys.readouterr().err


def test_embedded_server_flags_are_tf_serving_flags():
    names = {opt[2:] for action in embedded_parser()._actions for opt in action.option_strings if opt.startswith("--")}
    names.discard("help")
    assert names - EMBEDDED_ONLY_FLAGS <= TF_SERVING_FLAGS, names - EMBEDDED_ONLY_FLAGS - TF_SERVING_FLAGS
    assert {"port", "model_name", "model_base_path", "model_config_file", "enable_batching",
            "batching_parameters_file"} <= names


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_serve_targets_dry_run(tmp_path):
    def make(*args: str) -> str:
        result = subprocess.run(["make", "-s", "-o", "venv", *args, "DRY_RUN=1", f"BASE_PATH={tmp_path}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stdout.strip().splitlines()[-1]

    command = shlex.split(make("serve-tfserving", "PORT=8600"))
    assert command[0] in ("tensorflow_model_server", "docker")
    assert "--port=8600" in command
    if shutil.which("tensorflow_model_server") is None:
        gpu = shutil.which("nvidia-smi") is not None and bool(tensorflow_gpus())  # what TensorFlow sees decides
        unbatched = shlex.split(make("serve", "MODEL=tiny", "PORT=8601", "BATCHING="))
        assert unbatched[1:] == ["-m", "serving", "--port", "8601", "--rest_api_port", "8501", "--host", "127.0.0.1",
                                 "--model_name", "tiny", "--model_base_path", f"{tmp_path}/tiny",
                                 "--monitoring_config_file", "serving/monitoring.config",
                                 "--tensorflow_session_config_file", f"serving/session{'' if gpu else '_cpu'}.config"]
        batched = shlex.split(make("serve", "MODEL=tiny", "PORT=8601"))
        assert batched[:len(unbatched)] == unbatched
        p = embedded_parser()
        _, options = options_from_args(p.parse_args(batched[3:]), p)
        assert options.rest_api_port == 8501 and options.monitoring.prometheus_config.enable
        assert options.session_config == read_session_config(SERVING / f"session{'' if gpu else '_cpu'}.config"
                                                             ).SerializeToString()
        expected = configs.read_batching_parameters(SERVING / ("batching.config" if gpu else "batching_cpu.config"))
        assert options.batching == expected


@pytest.mark.slow  # the XLA export
@pytest.mark.parametrize("runtime, flag", [("binary", "xla_cpu_compilation_enabled"),
                                           ("docker", "xla_gpu_compilation_enabled")])
def test_the_xla_flag_is_added_for_a_model_that_needs_it(capsys, tmp_path, jit_export, shapes_export, runtime, flag):
    """TF Serving turns XLA off unless told: a --jit-compile model would fail its first request."""
    for name in CONFIG_FILES[1:]:
        shutil.copy(SERVING / name, tmp_path / name)
    models = {"jit": jit_export.parent.name, "plain": shapes_export.parent.name}
    base = tmp_path / "models"  # both models under one base path, as the Docker mount has them
    base.mkdir()
    for export in (jit_export, shapes_export):
        (base / export.parent.name).symlink_to(export.parent)
    for served, folder in models.items():
        (tmp_path / "models.config").write_text(
            f'model_config_list {{ config {{ name: "{served}" base_path: "/models/{folder}" '
            'model_platform: "tensorflow" } }')
        argv = _dry_run(
            capsys, "--runtime", runtime, "--config-dir", str(tmp_path), "--base-path", str(base)
        )
        flags = flags_of(argv[argv.index(tfserving.IMAGE) + 1 :] if runtime == "docker" else argv[1:])
        assert flags.get(flag) == ("true" if served == "jit" else None), served


@pytest.mark.skipif(
    shutil.which("make") is None or shutil.which("tensorflow_model_server") is not None,
    reason="needs make, and the embedded server as `make serve`'s",
)
@pytest.mark.skipif(bool(tensorflow_gpus()), reason="needs a TensorFlow that sees no GPU")
def test_a_gpu_host_whose_tensorflow_sees_no_gpu_gets_the_cpu_batching_config(tmp_path):
    """nvidia-smi on PATH (a GPU host) is not enough: a CPU-only TensorFlow there serves on the CPU."""
    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["make", "-s", "-o", "venv", "serve", "DRY_RUN=1", f"BASE_PATH={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "--batching_parameters_file serving/batching_cpu.config" in result.stdout
