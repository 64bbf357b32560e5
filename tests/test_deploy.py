"""Deployment beyond one machine: the image, the compose file, the Kubernetes manifests, and the
client's load balancing over several replicas.

Docker and a cluster are not available here, so the files are checked for what can be checked
without them: the Dockerfile by a small parser of its instructions, the compose file with PyYAML
(and `docker compose config` where the plugin exists), every Kubernetes manifest against the
Kubernetes JSON schemas that `kubernetes-validate` ships (offline, strict: unknown fields fail),
and all of them against each other, serving/*.config, the Makefile and the flag names
tensorflow_model_server defines. The client part runs two embedded servers on loopback.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import yaml

import synthetic
from camserve.client import CamClient, protos
from camserve.client.channel import DEFAULT_OPTIONS, SERVICE_CONFIG, channel_options, grpc_target
from camserve.serving import configs, tfserving
from images import png, random_images
from servers import ServerProcess
from tf_serving_flags import TF_SERVING_FLAGS, flags_of

ROOT = pathlib.Path(__file__).resolve().parent.parent
SERVING = ROOT / "serving"
K8S = SERVING / "k8s"
MANIFESTS = ("deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml")


# --- what the other files are checked against ----------------------------------------------------


def _model_config():
    (model,) = configs.read_model_server_config(SERVING / "models.config").model_config_list.config
    return model


MODEL = _model_config()
STATUS_PATH = f"/v1/models/{MODEL.name}"
METRICS_PATH = configs.read_text_proto(SERVING / "monitoring.config", configs.MonitoringConfig).prometheus_config.path


def _make_default(name: str) -> str:
    """The value make gives the Makefile's variable `name` (defaults may refer to other variables)."""
    value = subprocess.run(["make", "-s", "--no-print-directory", "--eval", "print-%: ; @echo $($*)", f"print-{name}"],
                           cwd=ROOT, capture_output=True, text=True, check=True, env={**os.environ, "MAKEFLAGS": ""})
    assert value.stdout.strip(), f"Makefile has no default for {name}"
    return value.stdout.strip()


# --- Dockerfile --------------------------------------------------------------------------------

INSTRUCTIONS = {"ADD", "ARG", "CMD", "COPY", "ENTRYPOINT", "ENV", "EXPOSE", "FROM", "HEALTHCHECK", "LABEL",
                "ONBUILD", "RUN", "SHELL", "STOPSIGNAL", "USER", "VOLUME", "WORKDIR"}


def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """[(INSTRUCTION, arguments)] as Docker reads them: `\\` continues a line, `#` lines are
    comments (also inside a continuation), parser directives only before the first instruction."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            if not instructions and not pending and re.match(r"#\s*\w+\s*=", line):
                assert line.split("=")[0].lstrip("# ").strip().lower() in ("syntax", "escape", "check"), line
            continue
        if not line and not pending:
            continue
        pending += (" " if pending else "") + line.removesuffix("\\").strip()
        if line.endswith("\\"):
            continue
        keyword, _, arguments = pending.partition(" ")
        assert keyword.upper() in INSTRUCTIONS, f"line {number}: unknown instruction {keyword!r}"
        assert keyword == keyword.upper(), f"line {number}: write instructions in upper case"
        instructions.append((keyword, arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def _substitute(text: str, variables: dict[str, str]) -> str:
    def value(match):
        name = match[1] or match[2]
        assert name in variables, f"${name} is not defined"
        return variables[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


class Dockerfile:
    def __init__(self, path: pathlib.Path):
        self.instructions = parse_dockerfile(path.read_text())
        self.args: dict[str, str] = {}  # ARG defaults
        for keyword, arguments in self.instructions:
            if keyword == "ARG":
                name, _, default = arguments.partition("=")
                self.args[name] = default

    def all(self, keyword: str) -> list[str]:
        return [arguments for k, arguments in self.instructions if k == keyword]

    def one(self, keyword: str) -> str:
        (found,) = self.all(keyword)
        return found

    def exec_form(self, keyword: str) -> list[str]:
        value = json.loads(self.one(keyword))
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), f"{keyword} must be a JSON list"
        return value


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(SERVING / "Dockerfile")


def test_dockerfile_parser_reads_continuations_and_comments():
    parsed = parse_dockerfile('# syntax=docker/dockerfile:1\nARG A=1\n# note\nRUN a \\\n  # inside\n  b\n'
                              'ENTRYPOINT ["x", \\\n "y"]\n')
    assert parsed == [("ARG", "A=1"), ("RUN", "a b"), ("ENTRYPOINT", '["x", "y"]')]
    with pytest.raises(AssertionError, match="unknown instruction"):
        parse_dockerfile("FORM ubuntu\n")


def test_dockerfile_builds_on_the_pinned_tf_serving_gpu_image(dockerfile):
    assert dockerfile.instructions[0][0] in ("ARG", "FROM")
    base = _substitute(dockerfile.one("FROM"), dockerfile.args)
    assert base == tfserving.IMAGE, "serving/Dockerfile and `make serve-tfserving` should run the same TF Serving"
    repository, tag = base.split(":")
    assert repository == "tensorflow/serving" and tag.endswith("-gpu")
    # the TF Serving release of the TensorFlow the export uses
    tensorflow = re.search(r"^tensorflow==(\S+)$", (ROOT / "requirements.txt").read_text(), re.M)[1]
    assert tag == f"{tensorflow}-gpu"


def test_dockerfile_bakes_the_model_and_configs_where_models_config_expects_them(dockerfile):
    copies = [shlex.split(_substitute(c, dockerfile.args)) for c in dockerfile.all("COPY")]
    destinations = {}
    for *sources, destination in copies:
        for source in sources:
            destinations[source] = destination
    config_dir = tfserving.CONTAINER_CONFIG + "/"
    for name in ("models.config", "batching.config", "monitoring.config"):
        assert destinations[f"serving/{name}"] == config_dir
    # the model directory lands on the base_path models.config serves, under the Makefile's names
    assert dockerfile.args["MODEL_NAME"] == MODEL.name == _make_default("MODEL")
    assert dockerfile.args["MODEL_DIR"] == f"{_make_default('BASE_PATH')}/{MODEL.name}"
    assert destinations[dockerfile.args["MODEL_DIR"]] == MODEL.base_path
    # the build context filter (BuildKit) lets every COPY source through
    ignore = (SERVING / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:].count("!models") == 1
    for name in ("models.config", "batching.config", "monitoring.config"):
        assert f"!serving/{name}" in ignore


def test_dockerfile_runs_tf_serving_with_the_serving_configs(dockerfile):
    entrypoint = dockerfile.exec_form("ENTRYPOINT")
    assert pathlib.PurePosixPath(entrypoint[0]).name == tfserving.BINARY
    assert dockerfile.exec_form("CMD") == [], "CMD holds extra flags only"
    flags = flags_of(entrypoint[1:])
    assert set(flags) <= TF_SERVING_FLAGS, set(flags) - TF_SERVING_FLAGS
    # the flags `python -m serving.tfserving --runtime docker` uses, plus the deployment's own
    inside = tfserving.CONTAINER_CONFIG + "/"
    expected = flags_of(tfserving.server_flags(inside + "models.config", inside + "batching.config",
                                             inside + "monitoring.config", port=8500, rest_port=8501,
                                             poll_seconds=int(flags["file_system_poll_wait_seconds"]),
                                             gpu_memory_fraction=tfserving.GPU_MEMORY_FRACTION, xla="gpu",
                                             session_config=inside + "session.config"))
    extra = {name: flags.pop(name) for name in set(flags) - set(expected)}
    assert flags == expected
    assert set(extra) == {"grpc_channel_arguments"}
    for argument in extra["grpc_channel_arguments"].split(","):  # TF Serving: key=value,key=value
        key, value = argument.split("=")
        assert key.startswith("grpc.") and value.isdigit()
    # the ports are the ones the image exposes; the configs it names parse as TF Serving parses them
    assert set(dockerfile.one("EXPOSE").split()) == {flags["port"], flags["rest_api_port"]}
    tfserving.check_configs(SERVING / "models.config", SERVING / "batching.config", SERVING / "monitoring.config",
                            int(flags["rest_api_port"]), SERVING / "session.config")
    # the health check asks the REST model status of the served model
    healthcheck = dockerfile.one("HEALTHCHECK")
    env = dict(arg.split("=", 1) for arg in dockerfile.all("ENV") if "=" in arg)
    assert _substitute(env["MODEL_NAME"], dockerfile.args) == MODEL.name
    url = re.search(r"http://localhost:(\d+)(/\S*)", healthcheck.replace('"', " "))
    assert url[1] == flags["rest_api_port"] and _substitute(url[2], {"MODEL_NAME": MODEL.name}) == STATUS_PATH
    assert "AVAILABLE" in healthcheck


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_image_builds_serving_dockerfile(dockerfile):
    result = subprocess.run(["make", "-s", "image", "DRY_RUN=1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout.strip().splitlines()[-1])
    assert argv[:2] == ["docker", "build"] and argv[-1] == "."
    assert (ROOT / argv[argv.index("-f") + 1]) == SERVING / "Dockerfile"
    assert argv[argv.index("-t") + 1] == _make_default("IMAGE")
    build_args = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "--build-arg")
    assert build_args == {"MODEL_NAME": dockerfile.args["MODEL_NAME"], "MODEL_DIR": dockerfile.args["MODEL_DIR"]}
    refused = subprocess.run(["make", "-s", "image", "DRY_RUN=1", "MODEL=not_in_models_config"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0 and "models.config" in refused.stderr


# --- docker compose ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((SERVING / "docker-compose.yml").read_text())


def test_compose_runs_the_image_on_one_gpu(compose, dockerfile):
    (service,) = compose["services"].values()
    assert service["image"] == _make_default("IMAGE")
    build = service["build"]
    context = (SERVING / build["context"]).resolve()
    assert context == ROOT and (context / build["dockerfile"]) == SERVING / "Dockerfile"
    assert build["args"] == {name: dockerfile.args[name] for name in build["args"]}
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and device["count"] == 1
    flags = flags_of(dockerfile.exec_form("ENTRYPOINT")[1:])
    grpc_port, rest_port = flags["port"], flags["rest_api_port"]
    assert service["ports"] == [f"{grpc_port}:{grpc_port}", f"{rest_port}:{rest_port}"]
    kind, command = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and f"http://localhost:{flags['rest_api_port']}{STATUS_PATH} " in command
    assert "AVAILABLE" in command
    for key in ("interval", "timeout", "start_period"):
        assert re.fullmatch(r"\d+(ms|s|m)", service["healthcheck"][key]), key


def _docker_compose() -> list[str] | None:
    """`docker compose` (v2 plugin) or `docker-compose` (v1), whichever is installed."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30).returncode == 0
    ):
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


@pytest.mark.skipif(_docker_compose() is None, reason="neither docker compose nor docker-compose is installed")
def test_compose_file_is_valid_for_docker_compose():
    # `config` validates the file against the Compose schema without a Docker engine
    result = subprocess.run(
        [*_docker_compose(), "-f", str(SERVING / "docker-compose.yml"), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# --- Kubernetes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    found = {}
    for name in MANIFESTS:
        (document,) = list(yaml.safe_load_all((K8S / name).read_text()))
        found[document["kind"]] = document
    return found


def _schema_versions() -> list[str]:
    from kubernetes_validate import utils

    versions = sorted({utils.major_minor(v) for v in utils.all_versions()}, key=lambda v: tuple(map(int, v.split("."))))
    return [versions[0], versions[-1]]  # the oldest and newest Kubernetes the package has schemas of


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_is_valid_kubernetes(name):
    import kubernetes_validate

    (document,) = list(yaml.safe_load_all((K8S / name).read_text()))
    for version in _schema_versions():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name} (Kubernetes {version}): {'.'.join(map(str, err.path))}: {err.message}")


def test_the_validator_catches_mistakes(manifests):
    import kubernetes_validate

    broken = json.loads(json.dumps(manifests["Deployment"]))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/"}}  # typo
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(broken, _schema_versions()[-1], strict=True)
    broken = json.loads(json.dumps(manifests["HorizontalPodAutoscaler"]))
    broken["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, _schema_versions()[-1], strict=True)


def test_kustomization_applies_every_manifest(manifests):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(on_disk) == sorted(MANIFESTS)
    (image,) = kustomization["images"]
    container = manifests["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].split(":")[0] == image["name"]
    assert f"{image['newName']}:{image['newTag']}" == _make_default("IMAGE")


def test_deployment_agrees_with_the_image_and_models_config(manifests, dockerfile):
    deployment = manifests["Deployment"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["image"] == _make_default("IMAGE")
    flags = flags_of(dockerfile.exec_form("ENTRYPOINT")[1:])
    extra = flags_of(container.get("args", []))
    assert set(extra) <= TF_SERVING_FLAGS and not set(extra) & set(flags), "args append flags the image lacks"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": int(flags["port"]), "http": int(flags["rest_api_port"])}
    # GPU and the resources the autoscaler's CPU target is a percentage of
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
        assert (get["path"], port) == (STATUS_PATH, int(flags["rest_api_port"])), probe
    # Prometheus scrapes the REST port at monitoring.config's path
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == flags["rest_api_port"]
    assert annotations["prometheus.io/path"] == METRICS_PATH
    # the pod can finish its preStop pause before it is killed
    pause = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep" and int(pause[1]) < pod["spec"]["terminationGracePeriodSeconds"]


def test_service_hpa_and_pdb_select_the_deployment(manifests):
    deployment = manifests["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}

    service = manifests["Service"]["spec"]
    assert service["clusterIP"] == "None", "headless: DNS names every replica for client-side balancing"
    assert service["selector"].items() <= labels.items()
    for port in service["ports"]:
        assert port["port"] == ports[port["targetPort"]] and port["name"] == port["targetPort"]
    assert {p["name"]: p["port"] for p in service["ports"]}["grpc"] == 8500

    hpa = manifests["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource":
            assert metric["resource"]["name"] in container["resources"]["requests"]

    pdb = manifests["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable", 1) < hpa["spec"]["minReplicas"]


# --- client: targets, service config -----------------------------------------------------------


@pytest.mark.parametrize(
    "server, target",
    [
        ("localhost:8500", "localhost:8500"),
        ("dns:///camserve.default.svc.cluster.local:8500", "dns:///camserve.default.svc.cluster.local:8500"),
        ("ipv4:10.0.0.1:8500,10.0.0.2:8500", "ipv4:10.0.0.1:8500,10.0.0.2:8500"),
        ("10.0.0.1:8500, 10.0.0.2:8501", "ipv4:10.0.0.1:8500,10.0.0.2:8501"),
        ("[::1]:8500,[fe80::1]:8500", "ipv6:[::1]:8500,[fe80::1]:8500"),
        ("127.0.0.1:8500,127.0.0.1:8500", "ipv4:127.0.0.1:8500"),
        ("unix:/tmp/tfs.sock", "unix:/tmp/tfs.sock"),
    ],
)
def test_grpc_target(server, target):
    assert grpc_target(server) == target


@pytest.mark.parametrize("server", ["127.0.0.1:8500,[::1]:8500", "127.0.0.1,127.0.0.2:8500", "a:b,c:d", ""])
def test_bad_server_lists_are_refused(server):
    with pytest.raises(ValueError):
        grpc_target(server)


def test_service_config_balances_and_retries_unavailable_and_overload():
    options = dict(channel_options())
    config = json.loads(options["grpc.service_config"])
    assert config == SERVICE_CONFIG and config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method,) = config["methodConfig"]
    services = {name["service"] for name in method["name"]}
    assert services == {
        protos.PREDICT_METHOD.split("/")[1],
        protos.METADATA_METHOD.split("/")[1],
        "tensorflow.serving.ModelService",
    }
    policy = method["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"] and 2 <= policy["maxAttempts"] <= 5
    assert config["retryThrottling"]["maxTokens"] > 0  # retries stop while most calls fail
    assert options["grpc.lb_policy_name"] == "round_robin"
    assert options["grpc.keepalive_time_ms"] >= 10_000 and options["grpc.keepalive_timeout_ms"] > 0
    assert options["grpc.per_rpc_retry_buffer_size"] >= 16 * 2**20
    # overrides replace defaults of the same name instead of adding a second value
    merged = channel_options([("grpc.keepalive_time_ms", 60_000), ("grpc.primary_user_agent", "x")])
    assert [name for name, _ in merged].count("grpc.keepalive_time_ms") == 1
    assert dict(merged)["grpc.keepalive_time_ms"] == 60_000 and len(merged) == len(DEFAULT_OPTIONS) + 1


# --- client: two replicas on loopback ----------------------------------------------------------

SIZE = 32
CLASSES = 3


class Replica(ServerProcess):
    """One embedded server serving `tiny` from `base_path`, whose labels start with `prefix`."""

    def __init__(self, prefix: str, base_path: pathlib.Path):
        self.prefix = prefix
        super().__init__(
            ["--port", "0", "--model_name", "tiny", "--model_base_path", str(base_path), "--shutdown_grace_seconds",
             "1"],
            env={"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""},
        )


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Two servers of the same tiny model, exported with labels a0.. and b0.. to tell them apart."""

    root = tmp_path_factory.mktemp("replicas")
    synthetic.tiny_gap_cnn(root / "tiny.keras", SIZE, CLASSES, seed=5, filters=4, softmax=False)
    servers = []
    try:
        for prefix in "ab":
            (root / f"{prefix}.txt").write_text("".join(f"{prefix}{i}\n" for i in range(CLASSES)))
            synthetic.export_model(root / "tiny.keras", ["gradcam"], "tiny", root / prefix, version=1,
                                   labels=str(root / f"{prefix}.txt"), warmup_batch_sizes=(1,))
            servers.append(Replica(prefix, root / prefix / "tiny"))  # loads while the next one exports
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def test_client_spreads_calls_over_the_replicas(replicas, tmp_path):
    a, b = replicas
    server = f"{a.address},{b.address}"
    with CamClient(server, model="tiny", timeout=10) as client:
        client.wait_until_ready(30)
        image = png(random_images(1, SIZE, 0)[0])
        for _ in range(4):  # until both connections are up
            client.predict(image)
        served = [client.predict(image).class_label[0] for _ in range(40)]
    assert set(served) == {"a", "b"}
    assert min(served.count("a"), served.count("b")) >= 12, served  # round-robin: about half each

    # the command line takes the same list; dns:/// targets pass through to gRPC's resolver
    image_path = tmp_path / "image.png"
    image_path.write_bytes(image)
    result = subprocess.run(
        [sys.executable, "-m", "client", "predict", str(image_path), "--server", server, "--model", "tiny", "--top-k",
         "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"predict class \d+ [ab]\d", result.stdout), result.stdout
    port = a.address.rsplit(":", 1)[1]
    with CamClient(f"dns:///127.0.0.1:{port}", model="tiny", timeout=10) as client:
        assert client.predict(image).class_label.startswith("a")


def test_calls_survive_a_replica_that_dies_mid_run(replicas):
    """SIGKILL one replica while calls are in flight: every call still succeeds, and every call made
    after the kill is answered by the other one.

    A raw channel with client.channel's options and no retry of our own: gRPC's retry policy and
    round-robin do it. The images are larger than gRPC's default 256 KiB retry buffer. A call is
    judged by when it started, not by the order calls finish in, and the callers go on until enough
    calls started after the kill: this thread may get the CPU back to send the kill only many answers
    after the 16th, and an answer b sent just before it died may reach its caller after the kill."""
    a, b = replicas
    channel = grpc.insecure_channel(grpc_target(f"{a.address},{b.address}"), channel_options())
    predict = channel.unary_unary(
        protos.PREDICT_METHOD,
        request_serializer=protos.PredictRequest.SerializeToString,
        response_deserializer=protos.PredictResponse.FromString,
    )
    big = png(random_images(1, 320, 1)[0])
    assert len(big) > 256 * 1024

    def call() -> tuple[float, str]:
        """(when it started, the replica that answered)"""
        request = protos.PredictRequest(output_filter=["class_label"])
        request.model_spec.name = "tiny"
        request.model_spec.signature_name = "predict_bytes"
        request.inputs["image_bytes"].CopyFrom(protos.make_tensor(np.array([big], dtype=object)))
        started = time.monotonic()
        response = predict(request, timeout=20)
        label = protos.to_numpy(response.outputs["class_label"])[0]
        return started, (label.decode() if isinstance(label, bytes) else str(label))[0]

    before, after = 16, 24
    answers: list[tuple[float, str]] = []
    killed: list[float] = []  # set once the kill is sent: b runs nothing after it
    progress = threading.Condition()

    def caller() -> None:
        """Calls one after another until `after` calls that started after the kill are answered."""
        while True:
            with progress:
                if killed and sum(started > killed[0] for started, _ in answers) >= after:
                    return
            answer = call()
            with progress:
                answers.append(answer)
                progress.notify_all()

    try:
        for _ in range(4):  # until both connections are up
            call()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            callers = [pool.submit(caller) for _ in range(4)]
            with progress:
                progress.wait_for(lambda: len(answers) >= before, timeout=60)
                served_before = [server for _, server in answers]
            b.proc.send_signal(signal.SIGKILL)
            with progress:
                killed.append(time.monotonic())
            for future in callers:
                future.result()  # raises if a call failed
        assert b.proc.wait(timeout=30) == -signal.SIGKILL, "the server process itself died"
    finally:
        channel.close()
        b.stop()
    served_after = [server for started, server in answers if started > killed[0]]
    assert len(served_before) >= before and set(served_before) == {"a", "b"}, f"both served before: {served_before}"
    assert len(served_after) >= after and set(served_after) == {"a"}, f"after it, only the live one: {served_after}"
