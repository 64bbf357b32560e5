"""python -m bench.cold_start: what a freshly started server costs before and just after it is ready.

1. In-process, the way TF Serving loads a version (serving/servables/session.py): LoadSavedModel, then each
   warm-up record replayed in file order, timed one by one; a record whose (signature, outputs) was
   not run before builds an executor (TF Serving's session builds one per distinct set of feeds and
   fetches, with Grappler over the graph), the others only run.
2. A fresh embedded server (a subprocess, `python -m serving`): start -> the model answers, then the
   first call of each signature as our client, CLI and page send it (their default outputs) vs the
   median of the next calls. A first call much slower than the next ones means the warm-up missed it.
Prints a table and writes `<out>/cold_start.json`.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from .__main__ import SAMPLE, latest_version, machine

CALLS = 6  # after the first


def replay_breakdown(version_dir: pathlib.Path) -> dict:
    """LoadSavedModel, then every warm-up record, timed; grouped by whether it built an executor."""
    from camserve.serving.servables.warmup import read_warmup_requests
    from camserve.serving.signatures import ModelVersion

    started = time.perf_counter()
    version = ModelVersion.load("m", 1, str(version_dir))
    load_s = time.perf_counter() - started
    records, seen = [], set()
    for request in read_warmup_requests(version_dir):
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
    by_kind = collections.defaultdict(float)
    for r in records:
        by_kind["executor builds" if r["new_executor"] else "repeats"] += r["seconds"]
    return {"load_s": load_s, "records": records, "executors": len(seen),
            "replay_s": sum(r["seconds"] for r in records), "replay_by_kind_s": dict(by_kind)}


def server_cold_start(model_dir: pathlib.Path, model: str, batching: str, timeout: float) -> dict:
    """Start an embedded server, wait until the model answers, then time first vs next calls."""
    from camserve.client.api import CamClient

    port = free_port()
    command = [sys.executable, "-m", "serving", "--port", str(port), "--model_name", model,
               "--model_base_path", str(model_dir.resolve()), "--file_system_poll_wait_seconds", "0"]
    if batching:
        command += ["--enable_batching", "--batching_parameters_file", batching]
    log = tempfile.TemporaryFile()
    started = time.perf_counter()
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        with CamClient(f"localhost:{port}", model, timeout=120) as client:
            client.wait_until_ready(timeout, interval=0.1)
            ready_s = time.perf_counter() - started
            array = np.ascontiguousarray(_sample(client.model_image_size()))
            encoded = SAMPLE.read_bytes()  # read once: no file I/O inside the timed calls
            calls = {"predict_bytes": lambda: client.predict(encoded),
                     "predict": lambda: client.predict(array)}
            for method in client.explain_methods():
                calls[f"{method}_bytes"] = lambda m=method: client.explain(encoded, method=m)
                calls[method] = lambda m=method: client.explain(array, method=m)
            jpeg = np.array([encoded], dtype=object)
            for name, signature in client._signature_defs().items():  # every output: what REST asks
                if name.endswith("_compact"):
                    inputs = {"image_bytes": jpeg, "class_index": np.array([-1], np.int32)}
                    calls[f"{name} (all outputs)"] = lambda n=name, s=signature: client.call(
                        n, {k: v for k, v in inputs.items() if k in s.inputs})
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.cvtColor(cv2.resize(cv2.imread(str(SAMPLE)), size[::-1]), cv2.COLOR_BGR2RGB)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cold_start", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="efficientnet_lite0_cam")
    p.add_argument("--model-dir", default="models/efficientnet_lite0_cam")
    p.add_argument("--runs", type=int, default=3, help="fresh servers started one after the other (0: in-process only)")
    p.add_argument("--batching", default="", help="batching parameters file of the server (default: none)")
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="bench")
    args = p.parse_args(argv)
    model_dir = pathlib.Path(args.model_dir)

    breakdown = replay_breakdown(latest_version(model_dir))
    print(f"LoadSavedModel {breakdown['load_s']:.1f} s; warm-up replay {breakdown['replay_s']:.1f} s: "
          f"{len(breakdown['records'])} records, {breakdown['executors']} executors "
          + ", ".join(f"{k} {v:.1f} s" for k, v in breakdown["replay_by_kind_s"].items()))
    for r in breakdown["records"]:
        print(f"  {r['seconds'] * 1e3:8.0f} ms  {'new ' if r['new_executor'] else '    '} {r['signature']:<22s} "
              f"b{r['batch']} {','.join(r['outputs'])}")
    runs = [server_cold_start(model_dir, args.model, args.batching, args.timeout) for _ in range(args.runs)]
    if runs:
        print_runs(runs)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "command": " ".join(["python -m bench.cold_start", *(argv or sys.argv[1:])]),
              "machine": machine(), "model": str(latest_version(model_dir)), "breakdown": breakdown, "runs": runs}
    (out / "cold_start.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {out / 'cold_start.json'}")
    return 0


def print_runs(runs: list[dict]) -> None:
    ready = [r["ready_s"] for r in runs]
    print(f"start -> ready: {', '.join(f'{s:.1f}' for s in ready)} s (median {np.median(ready):.1f})")
    for line in runs[-1]["server_log"]:
        print(f"  {line}")
    print(f"{'signature (client defaults)':<28s} {'first ms':>9s} {'next ms':>8s} {'first/next':>10s} (median of runs)")
    for name in runs[0]["first_calls"]:
        f = [r["first_calls"][name] for r in runs]
        print(f"{name:<28s} {np.median([x['first_ms'] for x in f]):9.0f} "
              f"{np.median([x['next_median_ms'] for x in f]):8.0f} {np.median([x['ratio'] for x in f]):10.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
