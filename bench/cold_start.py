"""python -m bench.cold_start: what a new version costs before it answers, and just after, against a plain classifier.

1. Export (with --backbone): ours (`python -m export` with --methods) and the plain classifier export
   of the same backbone and weights (bench/plain.py), each timed in a process of its own.
2. Time to ready on TF Serving's path, side by side: in a fresh process each time, LoadSavedModel, then
   the warm-up replayed record by record in file order (TF Serving's default: one warm-up thread), for
   the plain export and ours in turn, round after round, under TensorFlow's default session settings
   and under each of serving/'s (session.config: GPU servers; session_cpu.config: CPU servers). A
   record whose (signature, outputs) was not run before builds an executor (TF Serving's session builds
   one per distinct set of feeds and fetches, Grappler over the graph), the others only run. Medians of
   the rounds, and the ratio ours / plain.
3. A fresh embedded server (a subprocess, `python -m serving` with this machine's session config): start -> the
   model answers, then the first call of each call our client makes by default (every method, file
   and array, predict, and the REST compact answer) vs the median of the next calls. A first call much
   slower than the next ones means the warm-up missed it.
Prints tables and writes `<out>/cold_start.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from .__main__ import SAMPLE, latest_version, machine

CALLS = 6  # after the first
SERVING = pathlib.Path(__file__).resolve().parent.parent / "serving"
CONFIGS = {"TensorFlow's defaults": "", "serving/session.config": str(SERVING / "session.config"),
           "serving/session_cpu.config": str(SERVING / "session_cpu.config")}


def replay_breakdown(version_dir: pathlib.Path, session_config: str = "") -> dict:
    """LoadSavedModel, then every warm-up record, timed, as TF Serving loads a version (in this process)."""
    from camserve.serving.servables.session_config import session_config as read_config
    from camserve.serving.servables.warmup import read_warmup_requests
    from camserve.serving.signatures import ModelVersion

    config = read_config(session_config) if session_config else b""
    requests = list(read_warmup_requests(version_dir))
    started = time.perf_counter()
    version = ModelVersion.load("m", 1, str(version_dir), config)
    load_s = time.perf_counter() - started
    records, seen = [], set()
    for request in requests:
        signature = version.signature(request.model_spec.signature_name)
        outputs = signature.check_output_filter(request.output_filter)
        inputs, batch = signature.decode_inputs(request.inputs, 2**31 - 1)
        key = (tuple(sorted(signature.inputs[k].name for k in inputs)),
               tuple(sorted(signature.outputs[a].name for a in (outputs or signature.outputs))))
        started = time.perf_counter()
        signature.run(inputs, outputs)
        records.append({"signature": signature.name, "outputs": list(outputs or ["(all)"]), "batch": batch,
                        "new_executor": key not in seen, "seconds": time.perf_counter() - started})
        seen.add(key)
    version.session.close()
    replay_s = sum(r["seconds"] for r in records)
    return {"load_s": load_s, "replay_s": replay_s, "ready_s": load_s + replay_s, "records": records,
            "executors": len(seen), "executor_builds_s": sum(r["seconds"] for r in records if r["new_executor"])}


def ready_in_child(version_dir: pathlib.Path, session_config: str) -> dict:
    """replay_breakdown in a fresh process: nothing cached from an earlier load (TensorFlow's kernels,
    oneDNN's primitives) makes a later one look faster. With TF Serving's own time to ready:
    LoadSavedModel as TensorFlow's loader logs it, which the C API's load (`load_s`) exceeds by an import
    of the whole graph into the caller's TF_Graph that TF Serving does not make, then the same replay."""
    done = subprocess.run([sys.executable, "-m", "camserve.bench.cold_start", "--ready-of", str(version_dir),
                           "--session-config", session_config], capture_output=True, text=True,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"})
    if done.returncode:
        raise RuntimeError(f"timing the load of {version_dir} failed:\n{done.stderr[-3000:]}")
    breakdown = json.loads(done.stdout.strip().splitlines()[-1])
    [took] = re.findall(r"SavedModel load for tags \{ serve \}; Status: success: OK\. Took (\d+) microseconds",
                        done.stderr)
    breakdown["loader_s"] = int(took) / 1e6
    breakdown["tf_serving_ready_s"] = breakdown["loader_s"] + breakdown["replay_s"]
    return breakdown


def time_to_ready(models: dict[str, pathlib.Path], rounds: int) -> dict:
    """{config: {model: [breakdown of each round]}}, the models interleaved round by round."""
    results = {config: {name: [] for name in models} for config in CONFIGS}
    for _ in range(rounds):
        for config, path in CONFIGS.items():
            for name, version in models.items():
                results[config][name].append(ready_in_child(version, path))
    return results


def timed_export(arguments: list[str]) -> float:
    """Seconds of `python -m export ARGUMENTS` in a process of its own (Python and TensorFlow's start included)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "camserve.export", *arguments], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"python -m export {' '.join(arguments)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def timed_plain_export(folder: pathlib.Path, backbone: str, weights: str) -> float:
    code = ("import pathlib, sys; from camserve.bench.plain import export_plain; "
            "export_plain(pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3])")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, str(folder), backbone, weights], capture_output=True,
                          text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode:
        raise RuntimeError(f"the plain export failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def server_cold_start(model_dir: pathlib.Path, model: str, batching: str, timeout: float) -> dict:
    """Start an embedded server, wait until the model answers, then time first vs next calls."""
    from camserve.client.api import CamClient
    from camserve.client.outputs import explained_methods

    port = free_port()
    command = [sys.executable, "-m", "camserve.serving", "--port", str(port), "--model_name", model,
               "--model_base_path", str(model_dir.resolve()), "--file_system_poll_wait_seconds", "0",
               "--tensorflow_session_config_file", machine_session_config()]
    if batching:
        command += ["--enable_batching", "--batching_parameters_file", batching]
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with CamClient(f"localhost:{port}", model, timeout=120) as client:
            client.wait_until_ready(timeout, interval=0.1)
            ready_s = time.perf_counter() - started
            encoded = SAMPLE.read_bytes()  # read once: no file I/O inside the timed calls
            array = _sample()
            calls = {"predict": lambda: client.predict(encoded), "predict (array)": lambda: client.predict(array)}
            for method in client.explain_methods():
                calls[method] = lambda m=method: client.explain(encoded, method=m)
                calls[f"{method} (array)"] = lambda m=method: client.explain(array, method=m)
            defs = client._signature_defs()
            for signature, row in explained_methods(defs).values():  # each family's compact answer, as REST asks it
                compact = signature.replace("_bytes", "_compact")
                if row and f"{compact} (REST, every output)" not in calls:
                    inputs = {"image_bytes": np.array([encoded], dtype=object), "class_index": np.array([-1], np.int32),
                              "method": np.array([row], dtype=object)}
                    calls[f"{compact} (REST, every output)"] = lambda n=compact, i=inputs: client.call(n, i)
            first = {}
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                first[name] = {"first_ms": (time.perf_counter() - t) * 1e3}
            for name, call in calls.items():
                times = []
                for _ in range(CALLS):
                    t = time.perf_counter()
                    call()
                    times.append(time.perf_counter() - t)
                first[name]["next_median_ms"] = float(np.median(times)) * 1e3
                first[name]["ratio"] = first[name]["first_ms"] / first[name]["next_median_ms"]
    finally:
        server.terminate()
        server.wait(30)
    log.seek(0)
    loaded = [line for line in log.read().decode(errors="replace").splitlines() if "loaded model" in line]
    return {"ready_s": ready_s, "server_log": loaded, "first_calls": first}


def machine_session_config() -> str:
    """The session config a server on this machine runs (the Makefile's choice: serving/gpu.py)."""
    from camserve.serving.gpu import tensorflow_gpus

    return CONFIGS["serving/session.config" if tensorflow_gpus() else "serving/session_cpu.config"]


def signature_count(version_dir: pathlib.Path) -> int:
    from tensorflow.core.protobuf import saved_model_pb2

    saved = saved_model_pb2.SavedModel.FromString(pathlib.Path(version_dir, "saved_model.pb").read_bytes())
    return len([name for name in saved.meta_graphs[0].signature_def if name != "__saved_model_init_op"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample() -> np.ndarray:
    import cv2

    return np.ascontiguousarray(cv2.cvtColor(cv2.imread(str(SAMPLE)), cv2.COLOR_BGR2RGB))


def print_ready(results: dict, names: list[str]) -> dict:
    """The time-to-ready table; returns {config: {server: ratio of each model to the first (the plain one)}}."""
    ratios = {}
    servers = {"TF Serving": ("tf_serving_ready_s", "loader_s"), "embedded": ("ready_s", "load_s")}
    print(f"{'time to ready (load), median of rounds':<50s} " + " ".join(f"{n:>22s}" for n in names))
    for config, by_model in results.items():
        ratios[config] = {}
        for server, (ready_key, load_key) in servers.items():
            ready = {n: float(np.median([r[ready_key] for r in by_model[n]])) for n in names}
            load = {n: float(np.median([r[load_key] for r in by_model[n]])) for n in names}
            ratios[config][server] = {n: ready[n] / ready[names[0]] for n in names[1:]}
            print(f"  {config + ', ' + server:<48s} " + " ".join(
                (f"{ready[n]:5.2f} s ({load[n]:4.2f})" + (f" {ratios[config][server][n]:4.2f}x" if n != names[0]
                                                         else "")).rjust(22) for n in names))
    for n in names:
        example = results[list(CONFIGS)[-1]][n][-1]
        print(f"  {n}: {len(example['records'])} warm-up records, {example['executors']} executors "
              f"({example['executor_builds_s']:.2f} s of the replay in the last round)")
    return ratios


def print_runs(runs: list[dict]) -> None:
    ready = [r["ready_s"] for r in runs]
    print(f"embedded server, start -> ready: {', '.join(f'{s:.1f}' for s in ready)} s (median {np.median(ready):.1f})")
    for line in runs[-1]["server_log"]:
        print(f"  {line}")
    print(f"{'call (client defaults)':<36s} {'first ms':>9s} {'next ms':>8s} {'first/next':>10s} (median of runs)")
    for name in runs[0]["first_calls"]:
        f = [r["first_calls"][name] for r in runs]
        print(f"{name:<36s} {np.median([x['first_ms'] for x in f]):9.0f} "
              f"{np.median([x['next_median_ms'] for x in f]):8.0f} {np.median([x['ratio'] for x in f]):10.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0_cam", help="the model's name on the server")
    p.add_argument("--model-dir", default="", help="an exported model's folder (default: export one: --backbone)")
    p.add_argument("--backbone", default="", help="export ours and the plain classifier of this backbone, timed")
    p.add_argument("--weights", default="auto")
    p.add_argument("--methods", default="gradcam,cam", help="--methods of our export")
    p.add_argument("--rounds", type=int, default=3, help="time-to-ready rounds, each model in a fresh process")
    p.add_argument("--runs", type=int, default=1, help="fresh servers started one after the other (0: none)")
    p.add_argument("--batching", default="", help="batching parameters file of the server (default: none)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="bench")
    p.add_argument("--ready-of", default="", help=argparse.SUPPRESS)  # the child of ready_in_child
    p.add_argument("--session-config", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ready_of:
        print(json.dumps(replay_breakdown(pathlib.Path(args.ready_of), args.session_config)))
        return 0
    if not args.model_dir and not args.backbone:
        p.error("give --model-dir (an export) or --backbone (export one, and a plain classifier beside it)")
    with tempfile.TemporaryDirectory(prefix="cold-start-") as scratch:
        models, exports = {}, {}
        if args.backbone:
            plain_dir = pathlib.Path(scratch, "plain")
            exports["plain classifier"] = timed_plain_export(plain_dir, args.backbone, args.weights)
            models["plain classifier"] = latest_version(plain_dir)
        model_dir = pathlib.Path(args.model_dir) if args.model_dir else pathlib.Path(scratch, args.model)
        if not args.model_dir:
            exports["ours"] = timed_export(["--backbone", args.backbone, "--weights", args.weights, "--methods",
                                            args.methods, "--model-name", args.model, "--base-path", scratch])
        models["ours"] = latest_version(model_dir)
        for name, seconds in exports.items():
            print(f"export, {name}: {seconds:.1f} s (a process of its own, Python and TensorFlow's start included)")
        ready = time_to_ready(models, args.rounds)
        ratios = print_ready(ready, list(models))
        breakdown = ready[list(CONFIGS)[-1]]["ours"][-1]
        print(f"ours, under {list(CONFIGS)[-1]}, last round: LoadSavedModel {breakdown['load_s']:.2f} s, then")
        for r in breakdown["records"]:
            print(f"  {r['seconds'] * 1e3:8.0f} ms  {'new ' if r['new_executor'] else '    '} {r['signature']:<24s} "
                  f"b{r['batch']} {','.join(r['outputs'])}")
        runs = [server_cold_start(model_dir, args.model, args.batching, args.timeout) for _ in range(args.runs)]
        if runs:
            print_runs(runs)
        signatures = signature_count(models["ours"])
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join(["python -m bench.cold_start", *(argv or sys.argv[1:])]),
              "machine": machine(), "exports_s": exports, "signatures": signatures, "time_to_ready": ready,
              "ratios": ratios, "runs": runs}
    (out / "cold_start.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'cold_start.json'}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
