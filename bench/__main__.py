"""python -m bench: latency and throughput, side by side in one run.

1. in-process: the SavedModel's signatures called directly, as TF Serving runs them (LoadSavedModel,
   one Session::Run per call): predict vs each explain method, batch 1 and 8, the floor that the
   server adds to;
2. the seed notebook's way (eager tape over the Keras model, numpy channel loop, cv2.resize),
   the reference users come from;
3. over gRPC against a running server: signatures, encoded bytes vs uint8 tensor, full outputs vs
   the compact heatmap only, batch 1 and 8, closed-loop concurrency 1, 4 and 16;
4. with --rest: one image through the REST API (JSON, b64) against the same call over gRPC,
   interleaved.
Writes a table to stdout, `<out>/results.json` and `<out>/latency.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Callable

import numpy as np

from bench.grpc_load import SUMMARY, closed_loop, predict_request, raw_predict
from bench.inprocess import round_robin, seed_gradcam, signature_calls

SAMPLE = pathlib.Path(__file__).resolve().parent.parent / "samples" / "rocket.jpg"


def stats(latencies: list[float], batch: int, wall: float | None = None) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "n": len(latencies),
        "p50_ms": float(np.percentile(ms, 50)),
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "images_per_s": batch * len(latencies) / wall if wall else batch / float(np.median(latencies)),
        "latencies_ms": [round(float(v), 2) for v in ms],  # in call order (round-robin rounds for in-process)
    }


def paired_ratio(a: dict, b: dict) -> float:
    """Median over rounds of a's latency / b's in the same round-robin round.

    Calls measured in turn share the machine's slow and fast moments; the per-round ratio cancels
    them, where the ratio of two medians on a shared 2-core machine moves by 10-20% from run to run.
    """
    return float(np.median(np.array(a["latencies_ms"]) / np.array(b["latencies_ms"])))


def progress(done: int, total: int, label: str) -> None:
    width = 30
    filled = int(width * done / total)
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label:<48.48s}")
    sys.stderr.flush()


def latest_version(model_dir: pathlib.Path) -> pathlib.Path:
    versions = sorted((p for p in model_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    if not versions:
        raise SystemExit(f"no exported version under {model_dir}: run make export")
    return versions[-1]


def grpc_configs(methods: list[str], max_in_flight: int = 32) -> list[dict]:
    """The gRPC configurations: each varies one thing from the headline (bytes, compact, b1, c1).

    Configurations with more than `max_in_flight` images in flight (batch x concurrency) are left
    out: batch 8 at concurrency 16 takes ~10 s per call on 2 cores, too long for a short run.
    """
    compact = ["heatmap_png_bytes"]
    configs = [dict(signature="predict_bytes", batch=1, concurrency=1, outputs=SUMMARY)]
    for method in methods:
        configs.append(dict(signature=f"{method}_bytes", batch=1, concurrency=1, outputs=compact))
    method = methods[0]
    configs += [
        dict(signature=f"{method}_bytes", batch=1, concurrency=1, outputs=[]),  # every output
        dict(signature=method, batch=1, concurrency=1, outputs=compact),  # uint8 tensor input
        dict(signature="predict_bytes", batch=8, concurrency=1, outputs=SUMMARY),
        dict(signature=f"{method}_bytes", batch=8, concurrency=1, outputs=compact),
    ]
    for concurrency in (4, 16):
        configs.append(dict(signature="predict_bytes", batch=1, concurrency=concurrency, outputs=SUMMARY))
        configs.append(dict(signature=f"{method}_bytes", batch=1, concurrency=concurrency, outputs=compact))
        configs.append(dict(signature=f"{method}_bytes", batch=8, concurrency=concurrency, outputs=compact))
    return [c for c in configs if c["batch"] * c["concurrency"] <= max_in_flight]


def config_name(c: dict) -> str:
    outputs = "all" if not c["outputs"] else ("summary" if c["outputs"] == SUMMARY else "+".join(c["outputs"]))
    return f"grpc {c['signature']} b{c['batch']} c{c['concurrency']} out={outputs}"


def machine() -> dict:
    import grpc
    import tensorflow as tf

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpus": [d.name for d in tf.config.list_physical_devices("GPU")],
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "grpcio": grpc.__version__,
        "numpy": np.__version__,
    }


def chart(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.5))
    for offset, key in ((-0.25, "p50_ms"), (0.0, "p90_ms"), (0.25, "p99_ms")):
        ax.barh(y + offset, [r[key] for r in rows], height=0.25, label=key.split("_")[0])
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("latency per request (ms, log scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary_ratios(by_name: dict, rows: list[dict], methods: list[str], configs: list[dict]) -> dict[str, float]:
    """The headline ratios: explain vs predict, gRPC vs in-process, concurrent vs best throughput."""
    ratios = {}
    for batch in (1, 8):
        base = by_name[f"in-process predict b{batch}"]
        for method in methods:
            ratios[f"in-process {method}/predict b{batch}"] = paired_ratio(by_name[f"in-process {method} b{batch}"], base)
        if f"seed-eager gradcam b{batch}" in by_name:
            seed = by_name[f"seed-eager gradcam b{batch}"]["p50_ms"]
            ratios[f"seed-eager gradcam / in-process predict b{batch}"] = seed / base["p50_ms"]
    if not configs:
        return ratios
    compact = ["heatmap_png_bytes"]
    interleaved = {c["signature"]: by_name.get(config_name(c) + " interleaved") for c in configs[:1 + len(methods)]}
    if all(interleaved.values()):
        for method in methods:
            ratios[f"grpc {method}_bytes/predict_bytes b1 c1, interleaved"] = paired_ratio(
                interleaved[f"{method}_bytes"], interleaved["predict_bytes"])
        for signature in ("predict_bytes", f"{methods[0]}_bytes"):
            ratios[f"grpc/in-process {signature} b1 c1, interleaved"] = paired_ratio(
                interleaved[signature], by_name[f"in-process {signature} b1"])
    for signature, outputs in (("predict_bytes", SUMMARY), (f"{methods[0]}_bytes", compact)):
        c16 = by_name.get(config_name(dict(signature=signature, batch=1, concurrency=16, outputs=outputs)))
        if c16 is None:
            continue
        # Batch 8 is the best in-process throughput on any machine we have seen; the one measured
        # around the c16 run (bracket) shares its moment, the one of the in-process phase does not.
        best = c16.get("in_process_b8_images_per_s") or max(
            r["images_per_s"] for r in rows if r["kind"] == "in-process" and r["signature"] == signature)
        ratios[f"grpc {signature} c16 b1 throughput / in-process b8 throughput"] = c16.get("images_per_s", 0) / best
    return ratios


def rest_vs_grpc(args: argparse.Namespace, signature: str, payload: Callable[[dict], bytes], jpeg: bytes) -> list[dict]:
    """One image, every output (REST has no output_filter), over REST (JSON, b64) and gRPC in turn."""
    from bench.rest import rest_predict

    config = dict(signature=signature, batch=1, concurrency=1, outputs=[])
    body = payload(config)
    channel, grpc_call = raw_predict(args.server)
    rest_call, rest_bytes = rest_predict(args.rest, args.model, signature, jpeg)
    sizes = {"grpc": (len(body), len(grpc_call(body, timeout=60))), "rest": (rest_bytes, len(rest_call()))}
    calls = {"grpc": lambda: grpc_call(body, timeout=60), "rest": rest_call}
    times = round_robin(calls, args.repeats, warmup=1)
    channel.close()
    return [{"name": f"{kind} {signature} b1 c1 all outputs interleaved", "kind": kind, **config,
             "request_bytes": sizes[kind][0], "response_bytes": sizes[kind][1], **stats(times[kind], 1)}
            for kind in calls]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--server", default="localhost:8500", help="gRPC address; empty: in-process only")
    p.add_argument("--model", default="resnet50_cam")
    p.add_argument("--model-dir", default="models/resnet50_cam", help="the exported model, for in-process")
    p.add_argument("--backbone", default="resnet50", help="for the seed notebook's way")
    p.add_argument("--target-layer", default="conv5_block3_out")
    p.add_argument("--weights", default="auto", help="for the seed's way (timing does not depend on values)")
    p.add_argument("--methods", default="", help="comma list of explain methods (default: every one the model has)")
    p.add_argument("--repeats", type=int, default=12, help="in-process calls per configuration and batch")
    p.add_argument("--seconds", type=float, default=2.5,
                   help="duration of each gRPC configuration; x (images in flight / 4), up to x4, when more")
    p.add_argument("--max-in-flight", type=int, default=32,
                   help="leave out gRPC configurations with more images in flight (batch x concurrency)")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for the server to serve the model")
    p.add_argument("--skip-seed", action="store_true")
    p.add_argument("--skip-inprocess", action="store_true", help="gRPC figures only (no ratios to in-process)")
    p.add_argument("--rest", default="", help="REST address (host:8501) for the REST vs gRPC phase; empty: none")
    p.add_argument("--only", default="", help="run only the gRPC configurations whose name contains this")
    p.add_argument("--out", default="bench")
    args = p.parse_args(argv)

    if args.skip_inprocess and not args.server:
        p.error("--skip-inprocess needs --server: there would be nothing to measure")
    version_dir = latest_version(pathlib.Path(args.model_dir))
    jpeg = SAMPLE.read_bytes()
    if args.skip_inprocess:
        args.skip_seed = True

    def payload(config: dict) -> bytes:
        uint8 = config["signature"] in methods
        return predict_request(args.model, config["signature"], config["batch"], None if uint8 else jpeg,
                               image if uint8 else None, config["outputs"])

    from client.api import CamClient, explain_methods

    if not args.skip_inprocess:
        from export.tfs_loader import SavedModelSession

        model = SavedModelSession(version_dir)  # once, while the server loads too
    if args.server:
        progress(0, 1, f"waiting for {args.model} at {args.server}")
        with CamClient(args.server, args.model) as client:
            client.wait_until_ready(args.wait)
            height, width = client.model_image_size()
            available = client.explain_methods()
    else:
        height, width = (d.size for d in model.signature_defs["predict"].inputs["images"].tensor_shape.dim[1:3])
        available = explain_methods(model.signature_defs)
    # gradcam first where there is one: the configurations beyond one call per method use the first.
    methods = [m for m in args.methods.split(",") if m] or sorted(available, key=lambda m: (m != "gradcam", m))
    configs = [c for c in grpc_configs(methods, args.max_in_flight) if args.only in config_name(c)] if args.server else []
    total = (0 if args.skip_inprocess else 2) + (0 if args.skip_seed else 2) + len(configs) + bool(args.rest)
    done = 0
    rows: list[dict] = []
    import cv2

    image = cv2.cvtColor(cv2.resize(cv2.imread(str(SAMPLE)), (width, height)), cv2.COLOR_BGR2RGB)
    images = np.stack([image] * 8)
    for batch in () if args.skip_inprocess else (1, 8):
        progress(done, total, f"in-process batch {batch}")
        signatures = ["predict", *methods, "predict_bytes", f"{methods[0]}_bytes"]
        calls = {f"in-process {name} b{batch}": call
                 for name, call in signature_calls(model, signatures, batch, images, [jpeg]).items()}
        if args.server and batch == 1:
            # The headline gRPC calls, interleaved with the in-process ones: their ratio then
            # sees the same machine noise.
            channel, call = raw_predict(args.server)
            for config in grpc_configs(methods)[:1 + len(methods)]:  # predict_bytes, each <method>_bytes
                calls[config_name(config) + " interleaved"] = lambda body=payload(config): call(body, timeout=60)
        repeats = args.repeats if batch == 1 else max(3, args.repeats // 2)
        for name, times in round_robin(calls, repeats, warmup=1).items():
            rows.append({"name": name, "kind": name.split()[0], "signature": name.split()[1],
                         "batch": batch, "concurrency": 1, **stats(times, batch)})
        if args.server and batch == 1:
            channel.close()
        done += 1
    if not args.skip_seed:
        predict, explain = seed_gradcam(args.backbone, args.target_layer, args.weights)
        for batch in (1, 8):
            progress(done, total, f"seed notebook's way batch {batch}")
            times = round_robin({"predict": lambda: predict(images[:batch]), "gradcam": lambda: explain(images[:batch])},
                                max(2, args.repeats // (3 if batch == 1 else 6)),
                                warmup=1 if batch == 1 else 0)  # eager: nothing is traced for batch 8
            for name, t in times.items():
                rows.append({"name": f"seed-eager {name} b{batch}", "kind": "seed", "signature": name,
                             "batch": batch, "concurrency": 1, **stats(t, batch)})
            done += 1
    # Concurrency-16 throughput is compared with in-process batch-8 calls made just before and just
    # after it, so that both see the same moment of a shared machine.
    brackets = {} if args.skip_inprocess else signature_calls(model, ["predict_bytes", f"{methods[0]}_bytes"], 8,
                                                              images, [jpeg])
    for config in configs:
        name = config_name(config)
        progress(done, total, name)
        in_flight = config["batch"] * config["concurrency"]
        bracket = brackets.get(config["signature"]) if config["concurrency"] == 16 else None
        bracket_times = round_robin({"b8": bracket}, 2, warmup=0)["b8"] if bracket else []
        result = closed_loop(args.server, payload(config), config["concurrency"],
                             args.seconds * min(4.0, max(1.0, in_flight / 4)))
        row = {"name": name, "kind": "grpc", **config, "errors": result["errors"],
               "request_bytes": result["request_bytes"], "response_bytes": result["response_bytes"],
               "load_generator_cpu": result["cpu_share"]}
        if bracket:
            channel, call = raw_predict(args.server)
            call(payload(config), timeout=60)  # returns once the calls cancelled at the end have run
            channel.close()
            bracket_times += round_robin({"b8": bracket}, 2, warmup=0)["b8"]
            row["in_process_b8_images_per_s"] = 8 * len(bracket_times) / sum(bracket_times)
        row.update(stats(result["latencies_s"], config["batch"], result["wall_s"]) if result["latencies_s"] else {})
        rows.append(row)
        done += 1
    if args.rest and args.server:
        progress(done, total, "REST vs gRPC")
        rows += rest_vs_grpc(args, f"{methods[0]}_bytes", payload, jpeg)
        done += 1
    progress(done, total, "done")
    sys.stderr.write("\n")

    by_name = {r["name"]: r for r in rows}
    ratios = {} if args.skip_inprocess or args.only else summary_ratios(by_name, rows, methods, configs)
    rest_rows = [r for r in rows if r["kind"] == "rest"]
    if rest_rows:
        grpc_row = by_name[rest_rows[0]["name"].replace("rest ", "grpc ")]
        ratios[f"rest/grpc {rest_rows[0]['signature']} b1, all outputs, interleaved"] = paired_ratio(rest_rows[0], grpc_row)

    print(f"\n{'configuration':<62s} {'n':>5s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'img/s':>7s} {'req B':>8s} "
          f"{'resp B':>8s} {'gen CPU':>7s} err")
    for r in rows:
        cpu = f"{r['load_generator_cpu']:.0%}" if "load_generator_cpu" in r else ""
        print(f"{r['name']:<62s} {r.get('n', 0):5d} {r.get('p50_ms', 0):8.1f} {r.get('p90_ms', 0):8.1f} {r.get('p99_ms', 0):8.1f} "
              f"{r.get('images_per_s', 0):7.1f} {r.get('request_bytes', ''):>8} {r.get('response_bytes', ''):>8} {cpu:>7s} "
              f"{r.get('errors', '') or ''}")
    print("(gen CPU: the CPU time of the load generator, in cores, when it shares the machine with the server)")
    print()
    for key, value in ratios.items():
        print(f"{key:<72s} {value:6.3f}")

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"when": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
               "machine": machine(), "model": str(version_dir), "rows": rows, "ratios": ratios}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    chart(rows, out / "latency.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
