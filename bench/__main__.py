"""python -m bench: latency and throughput, side by side in one run.

1. in-process: the SavedModel's signatures called directly, as TF Serving runs them (LoadSavedModel,
   one Session::Run per call): predict vs each explain method, batch 1 and 8, what the server's
   own cost adds to;
2. the floor (bench/floor.py): predict and each explain method against a minimal plain forward and a
   minimal Grad-CAM of the same backbone, all on TF Serving's path, fetching probabilities or heatmap only;
3. Grad-CAM computed eagerly (a tape over the Keras model, a numpy channel loop, cv2.resize),
   the baseline;
4. over gRPC against a running server: signatures, encoded bytes vs uint8 tensor, full outputs vs
   the compact heatmap only, batch 1 and 8, closed-loop concurrency 1, 4 and 16;
5. with --rest: one image through the REST API (JSON, b64) against the same work over gRPC,
   interleaved: every output, and the compact answer (`<method>_compact`).
Writes a table to stdout, `<out>/results.json` and `<out>/latency.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import sys
import time

import numpy as np

from camserve.client.outputs import EXPLAIN_BYTES, PREDICT, explained_methods
from camserve.serving.servables.versions import numeric_versions

from .grpc_load import SUMMARY, closed_loop, raw_predict, serialised_request
from .inprocess import eager_gradcam, round_robin, signature_calls

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
    versions = numeric_versions(str(model_dir))
    if not versions:
        raise SystemExit(f"no exported version under {model_dir}: run make export")
    return model_dir / versions[max(versions)]


def client_calls(methods: list[str], signature_defs) -> dict[str, str]:
    """Each method, and "predict", -> the call the client makes for it (client/outputs.py): `<family>:<method>`,
    e.g. `explain_bytes:gradcam`, `explain_fused_bytes:layercam` for layercam_fused, `explain_bytes:predict`
    for the prediction; `<method>_bytes` on a model exported without the families."""
    signatures = explained_methods(signature_defs)
    calls = {m: f"{signature}:{row}" if row else signature for m, (signature, row) in
             ((m, signatures[m]) for m in methods)}
    calls["predict"] = f"{EXPLAIN_BYTES}:{PREDICT}" if EXPLAIN_BYTES in signature_defs else "predict_bytes"
    return calls


def images_call(call: str) -> str:
    """The same call on uint8 images: explain_bytes:gradcam -> explain:gradcam, gradcam_fused_bytes -> gradcam_fused."""
    signature, _, method = call.partition(":")
    return signature.removesuffix("_bytes") + (f":{method}" if method else "")


def grpc_configs(calls: dict[str, str], methods: list[str], max_in_flight: int = 32) -> list[dict]:
    """The gRPC configurations: each varies one thing from the headline (bytes, compact, b1, c1); `calls`
    as client_calls gives them.

    Configurations with more than `max_in_flight` images in flight (batch x concurrency) are left
    out: batch 8 at concurrency 16 is too slow per call on a small CPU for a short run (docs/BENCHMARKS.md).
    """
    compact = ["heatmap_png_bytes"]
    predict, explain = calls["predict"], calls[methods[0]]
    configs = [dict(call=predict, batch=1, concurrency=1, outputs=SUMMARY)]
    for method in methods:
        configs.append(dict(call=calls[method], batch=1, concurrency=1, outputs=compact))
    configs += [
        dict(call=explain, batch=1, concurrency=1, outputs=[]),  # every output
        dict(call=images_call(explain), batch=1, concurrency=1, outputs=compact),  # uint8 tensor input
        dict(call=predict, batch=8, concurrency=1, outputs=SUMMARY),
        dict(call=explain, batch=8, concurrency=1, outputs=compact),
    ]
    for concurrency in (4, 16):
        configs.append(dict(call=predict, batch=1, concurrency=concurrency, outputs=SUMMARY))
        configs.append(dict(call=explain, batch=1, concurrency=concurrency, outputs=compact))
        configs.append(dict(call=explain, batch=8, concurrency=concurrency, outputs=compact))
    return [c for c in configs if c["batch"] * c["concurrency"] <= max_in_flight]


def config_name(c: dict) -> str:
    outputs = "all" if not c["outputs"] else ("summary" if c["outputs"] == SUMMARY else "+".join(c["outputs"]))
    return f"grpc {c['call']} b{c['batch']} c{c['concurrency']} out={outputs}"


def machine() -> dict:
    import grpc
    import tensorflow as tf

    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
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


def paired(a: dict, b: dict) -> dict:
    """A headline ratio of two rows timed in turn, with the figures it is made of."""
    return {"value": paired_ratio(a, b),
            "figures": f"p50 {a['p50_ms']:.1f} / {b['p50_ms']:.1f} ms; median of {a['n']} per-round ratios"}


def summary_ratios(by_name: dict, rows: list[dict], methods: list[str], configs: list[dict],
                   calls: dict[str, str]) -> dict[str, dict]:
    """The headline ratios (explain vs predict, gRPC vs in-process, concurrent vs best throughput),
    each as {"value", "figures"}: the numbers it divides, as printed beside it."""
    ratios = {}
    predict = calls["predict"]
    for batch in (1, 8):
        base = by_name[f"in-process {images_call(predict)} b{batch}"]
        for method in methods:
            ratios[f"in-process {method}/predict b{batch}"] = paired(
                by_name[f"in-process {images_call(calls[method])} b{batch}"], base)
        if f"eager gradcam b{batch}" in by_name:
            eager = by_name[f"eager gradcam b{batch}"]["p50_ms"]
            ratios[f"eager gradcam / in-process predict b{batch}"] = {
                "value": eager / base["p50_ms"], "figures": f"p50 {eager:.1f} / {base['p50_ms']:.1f} ms"}
    if not configs:
        return ratios
    interleaved = {c["call"]: by_name.get(config_name(c) + " interleaved") for c in configs[: 1 + len(methods)]}
    explain = calls[methods[0]]
    if all(interleaved.values()):
        for method in methods:
            ratios[f"grpc {calls[method]}/{predict} b1 c1, interleaved"] = paired(interleaved[calls[method]],
                                                                                 interleaved[predict])
        for call in (predict, explain):
            ratios[f"grpc/in-process {call} b1 c1, interleaved"] = paired(interleaved[call],
                                                                          by_name[f"in-process {call} b1"])
    for call, outputs in ((predict, SUMMARY), (explain, ["heatmap_png_bytes"])):
        c16 = by_name.get(config_name(dict(call=call, batch=1, concurrency=16, outputs=outputs)))
        if c16 is None:
            continue
        # Batch 8 is the best in-process throughput on any machine we have seen; the one measured
        # around the c16 run (bracket) shares its moment, the one of the in-process phase does not.
        best, where = c16.get("in_process_b8_images_per_s"), "in-process b8 timed just before and after the c16 run"
        if not best:
            best = max(r["images_per_s"] for r in rows if r["kind"] == "in-process" and r["signature"] == call)
            where = "the best in-process row"
        got = c16.get("images_per_s", 0)
        ratios[f"grpc {call} c16 b1 throughput / in-process b8 throughput"] = {
            "value": got / best, "figures": f"{got:.1f} / {best:.1f} images/s ({where})"}
    return ratios


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--server", default="localhost:8500", help="gRPC address; empty: in-process only")
    p.add_argument("--model", default="efficientnet_lite0_cam")
    p.add_argument("--model-dir", default="models/efficientnet_lite0_cam", help="the exported model, for in-process")
    p.add_argument("--backbone", default="efficientnet_lite0", help="for the eager baseline: the served model's")
    p.add_argument("--target-layer", default="",
                   help="for the eager baseline (default: found as the exporter does)")
    p.add_argument("--weights", default="auto", help="for the eager baseline (timing does not depend on values)")
    p.add_argument("--methods", default="", help="comma list of explain methods (default: every one the model has)")
    p.add_argument("--repeats", type=int, default=12, help="in-process calls per configuration and batch")
    p.add_argument("--seconds", type=float, default=2.5,
                   help="duration of each gRPC configuration; x (images in flight / 4), up to x4, when more")
    p.add_argument("--max-in-flight", type=int, default=32,
                   help="leave out gRPC configurations with more images in flight (batch x concurrency)")
    p.add_argument("--wait", type=float, default=300, help="seconds to wait for the server to serve the model")
    p.add_argument("--floor-rounds", type=int, default=20,
                   help="rounds of the floor phase (minimal models built from --backbone, --weights, --target-layer) "
                        "at batch 1 and 8; 0: no floor phase")
    p.add_argument("--skip-eager", action="store_true")
    p.add_argument("--skip-inprocess", action="store_true", help="gRPC figures only (no ratios to in-process)")
    p.add_argument("--rest", default="", help="REST address (host:8501) for the REST vs gRPC phase; empty: none")
    p.add_argument("--only", default="", help="run only the gRPC configurations whose name contains this")
    p.add_argument("--out", default="bench")
    args = p.parse_args(argv)
    if args.skip_inprocess and not args.server:
        p.error("--skip-inprocess needs --server: there would be nothing to measure")
    args.skip_eager = args.skip_eager or args.skip_inprocess
    return args


class Run:
    """What every phase shares: the options, the model in-process, the methods, the sample image, progress."""

    def __init__(self, args: argparse.Namespace):
        from camserve.client.api import CamClient, explain_methods

        self.args = args
        self.version_dir = latest_version(pathlib.Path(args.model_dir))
        self.jpeg = SAMPLE.read_bytes()
        self.model = None
        if not args.skip_inprocess:
            from camserve.serving.servables.session import SavedModelSession
            from camserve.serving.servables.session_config import session_config

            # Once, while the server loads too, with the session settings a server on this machine runs.
            self.model = SavedModelSession(self.version_dir, config=session_config())
        if args.server:
            progress(0, 1, f"waiting for {args.model} at {args.server}")
            with CamClient(args.server, args.model) as client:
                client.wait_until_ready(args.wait)
                height, width = client.model_image_size()
                signature_defs = client._signature_defs()
        else:
            signature_defs = self.model.signature_defs
            dims = signature_defs["predict"].inputs["images"].tensor_shape.dim
            height, width = dims[1].size, dims[2].size
        self.available = explain_methods(signature_defs)
        # gradcam first where there is one: the configurations beyond one call per method use the first.
        self.methods = [m for m in args.methods.split(",") if m] or sorted(self.available,
                                                                          key=lambda m: (m != "gradcam", m))
        self.calls = client_calls(self.methods, signature_defs)
        self.configs = [c for c in grpc_configs(self.calls, self.methods, args.max_in_flight)
                        if args.only in config_name(c)] if args.server else []
        import cv2

        self.image = cv2.cvtColor(cv2.resize(cv2.imread(str(SAMPLE)), (width, height)), cv2.COLOR_BGR2RGB)
        self.images = np.stack([self.image] * 8)
        self.total = (0 if args.skip_inprocess else 2) + (0 if args.skip_eager else 2) + len(self.configs)
        self.total += bool(args.rest) + (3 if args.floor_rounds > 0 else 0)
        self.done = 0

    def step(self, label: str) -> None:
        progress(self.done, self.total, label)
        self.done += 1

    def payload(self, config: dict) -> bytes:
        """The serialised request of a gRPC configuration: the uint8 tensor for a signature without _bytes,
        else the JPEG."""
        signature, _, method = config["call"].partition(":")
        uint8 = not signature.endswith("_bytes")
        return serialised_request(self.args.model, signature, config["batch"], None if uint8 else self.jpeg,
                                  self.image if uint8 else None, config["outputs"], method or None)


def row(name: str, kind: str, signature: str, batch: int, times: list[float], **extra) -> dict:
    return {"name": name, "kind": kind, "signature": signature, "batch": batch, "concurrency": 1, **extra,
            **stats(times, batch)}


def in_process_phase(run: Run) -> list[dict]:
    """Each signature through TF Serving's loader, batch 1 and 8, round-robin; at batch 1 the headline
    gRPC calls are interleaved with them, so that their ratio sees the same machine noise."""
    rows = []
    for batch in (1, 8):
        run.step(f"in-process batch {batch}")
        predict, explain = run.calls["predict"], run.calls[run.methods[0]]
        signatures = [images_call(predict), *(images_call(run.calls[m]) for m in run.methods), predict, explain]
        calls = {f"in-process {name} b{batch}": call
                 for name, call in signature_calls(run.model, signatures, batch, run.images, [run.jpeg]).items()}
        channel = None
        if run.args.server and batch == 1:
            channel, call = raw_predict(run.args.server)
            for config in grpc_configs(run.calls, run.methods)[: 1 + len(run.methods)]:  # predict, each method
                calls[config_name(config) + " interleaved"] = lambda body=run.payload(config): call(body, timeout=60)
        repeats = run.args.repeats if batch == 1 else max(3, run.args.repeats // 2)
        for name, times in round_robin(calls, repeats, warmup=1).items():
            rows.append(row(name, name.split()[0], name.split()[1], batch, times))
        if channel is not None:
            channel.close()
    return rows


def floor_phase(run: Run) -> tuple[list[dict], dict]:
    """Our predict and explain signatures against the minimal models of bench/floor.py, interleaved round by
    round at batch 1 and 8: the rows, and the summary written to results.json as "floor"."""
    from camserve.serving.servables.session import SavedModelSession
    from camserve.serving.servables.session_config import session_config

    from .floor import FORWARD, GRADCAM, floor_calls, floor_methods, heatmap_difference, minimal_models

    args = run.args
    started = time.perf_counter()
    methods = floor_methods(run.available, [m for m in args.methods.split(",") if m])
    run.step("floor: building the minimal models")
    with contextlib.ExitStack() as stack:
        ours = run.model or stack.enter_context(SavedModelSession(run.version_dir, config=session_config()))
        minimal = stack.enter_context(minimal_models(args.backbone, args.weights, args.target_layer,
                                                     run.image.shape[:2]))
        summary = {"rounds": args.floor_rounds, "methods": methods, "backbone": args.backbone, "weights": args.weights,
                   "target_layer": minimal.target_layer, "build_s": round(minimal.build_seconds, 1)}
        rows = []
        for batch in (1, 8):
            run.step(f"floor batch {batch}")
            calls = floor_calls(ours, minimal, methods, run.images[:batch])
            measured = {name: row(f"floor {name} b{batch}", "floor", name.split()[-1], batch, times)
                        for name, times in round_robin(calls, args.floor_rounds, warmup=1).items()}
            rows += measured.values()
            ratios = {f"{GRADCAM} / {FORWARD}": paired(measured[GRADCAM], measured[FORWARD])}
            for method in methods:
                ratios[f"our {method} / our predict"] = paired(measured[f"our {method}"], measured["our predict"])
            ratios[f"our predict / {FORWARD}"] = paired(measured["our predict"], measured[FORWARD])
            summary[f"b{batch}"] = {"medians_ms": {name: round(r["p50_ms"], 2) for name, r in measured.items()},
                                    "ratios": ratios}
        # With the same weights the two Grad-CAMs are one computation: their maps agree (not with random weights).
        summary["heatmap_max_abs_diff"] = (heatmap_difference(ours, minimal, run.images[:1])
                                           if "gradcam" in run.available else None)
    summary["phase_s"] = round(time.perf_counter() - started, 1)
    return rows, summary


def eager_phase(run: Run) -> list[dict]:
    """The eager Grad-CAM baseline (a tape, a numpy loop, cv2.resize), batch 1 and 8."""
    predict, explain = eager_gradcam(run.args.backbone, run.args.target_layer, run.args.weights)
    rows = []
    for batch in (1, 8):
        run.step(f"eager Grad-CAM baseline batch {batch}")
        images = run.images[:batch]
        times = round_robin({"predict": lambda: predict(images), "gradcam": lambda: explain(images)},
                            max(2, run.args.repeats // (3 if batch == 1 else 6)),
                            warmup=1 if batch == 1 else 0)  # eager: nothing is traced for batch 8
        rows += [row(f"eager {name} b{batch}", "eager", name, batch, t) for name, t in times.items()]
    return rows


def grpc_phase(run: Run) -> list[dict]:
    """Closed loops per gRPC configuration. Concurrency-16 throughput is compared with in-process
    batch-8 calls made just before and just after it, so that both see the same moment of a shared machine."""
    brackets = {} if run.model is None else signature_calls(
        run.model, [run.calls["predict"], run.calls[run.methods[0]]], 8, run.images, [run.jpeg])
    rows = []
    for config in run.configs:
        name = config_name(config)
        run.step(name)
        in_flight = config["batch"] * config["concurrency"]
        bracket = brackets.get(config["call"]) if config["concurrency"] == 16 else None
        bracket_times = round_robin({"b8": bracket}, 2, warmup=0)["b8"] if bracket else []
        seconds = run.args.seconds * min(4.0, max(1.0, in_flight / 4))
        result = closed_loop(run.args.server, run.payload(config), config["concurrency"], seconds)
        measured = {"name": name, "kind": "grpc", **config, "errors": result["errors"],
                    "request_bytes": result["request_bytes"], "response_bytes": result["response_bytes"],
                    "load_generator_cpu": result["cpu_share"]}
        if bracket:
            channel, call = raw_predict(run.args.server)
            call(run.payload(config), timeout=60)  # returns once the calls cancelled at the end have run
            channel.close()
            bracket_times += round_robin({"b8": bracket}, 2, warmup=0)["b8"]
            measured["in_process_b8_images_per_s"] = 8 * len(bracket_times) / sum(bracket_times)
        if result["latencies_s"]:
            measured.update(stats(result["latencies_s"], config["batch"], result["wall_s"]))
        rows.append(measured)
    return rows


def rest_phase(run: Run) -> list[dict]:
    """One image over REST (JSON, b64) and over gRPC, interleaved, the first method as the client calls it
    (explain_bytes): every output (REST has no output_filter), and the compact answer, `explain_compact`
    over REST against `explain_bytes` with the same outputs over gRPC (one executor on the server: the
    same work)."""
    from camserve.client.outputs import EXPLAIN

    from .rest import rest_predict

    run.step("REST vs gRPC")
    call = run.calls[run.methods[0]]
    signature, _, method = call.partition(":")
    channel, grpc_call = raw_predict(run.args.server)
    cases = {}  # name -> (config, request body, call, request bytes)
    for outputs, rest_signature, label in (([], signature, "all outputs"),
                                           (EXPLAIN, signature.removesuffix("_bytes") + "_compact", "compact")):
        config = dict(call=call, batch=1, concurrency=1, outputs=outputs)
        body = run.payload(config)
        cases[f"grpc {call} b1 c1 {label} interleaved"] = (config, len(body), lambda b=body: grpc_call(b, timeout=60))
        rest_call, rest_bytes = rest_predict(run.args.rest, run.args.model, rest_signature, run.jpeg, method or None)
        cases[f"rest {rest_signature} b1 c1 {label} interleaved"] = (
            dict(config, call=rest_signature, outputs=[]), rest_bytes, rest_call)
    sizes = {name: len(call()) for name, (_, _, call) in cases.items()}
    times = round_robin({name: call for name, (_, _, call) in cases.items()}, run.args.repeats, warmup=1)
    channel.close()
    return [{"name": name, "kind": name.split()[0], **config, "request_bytes": request_bytes,
             "response_bytes": sizes[name], **stats(times[name], 1)}
            for name, (config, request_bytes, _) in cases.items()]


def print_table(rows: list[dict], ratios: dict[str, dict]) -> None:
    print(f"\n{'configuration':<62s} {'n':>5s} {'p50 ms':>8s} {'p90 ms':>8s} {'p99 ms':>8s} {'img/s':>7s} "
          f"{'req B':>8s} {'resp B':>8s} {'gen CPU':>7s} err")
    for r in rows:
        cpu = f"{r['load_generator_cpu']:.0%}" if "load_generator_cpu" in r else ""
        print(f"{r['name']:<62s} {r.get('n', 0):5d} {r.get('p50_ms', 0):8.1f} {r.get('p90_ms', 0):8.1f} "
              f"{r.get('p99_ms', 0):8.1f} {r.get('images_per_s', 0):7.1f} {r.get('request_bytes', ''):>8} "
              f"{r.get('response_bytes', ''):>8} {cpu:>7s} {r.get('errors', '') or ''}")
    print("(gen CPU: the CPU time of the load generator, in cores, when it shares the machine with the server)\n")
    for key, ratio in ratios.items():
        print(f"{key:<72s} {ratio['value']:6.3f}  = {ratio['figures']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = Run(args)
    rows = [] if args.skip_inprocess else in_process_phase(run)
    floor_rows, floor = floor_phase(run) if args.floor_rounds > 0 else ([], None)
    rows += floor_rows
    rows += [] if args.skip_eager else eager_phase(run)
    rows += grpc_phase(run)
    rows += rest_phase(run) if args.rest and args.server else []
    progress(run.total, run.total, "done")
    sys.stderr.write("\n")

    by_name = {r["name"]: r for r in rows}
    ratios = {} if args.skip_inprocess or args.only else summary_ratios(by_name, rows, run.methods, run.configs,
                                                                         run.calls)
    for rest_row in (r for r in rows if r["kind"] == "rest"):  # against the gRPC call of the same work
        label = rest_row["name"].split(" c1 ")[1]
        grpc_row = next(r for r in rows if r["kind"] == "grpc" and r["name"].endswith(f" c1 {label}"))
        ratios[f"rest/grpc {rest_row['call']} b1, {label}"] = paired(rest_row, grpc_row)
    for batch in (1, 8):
        for key, ratio in (floor or {}).get(f"b{batch}", {}).get("ratios", {}).items():
            ratios[f"floor {key} b{batch}"] = ratio
    print_table(rows, ratios)
    if floor:
        difference = floor["heatmap_max_abs_diff"]
        print(f"\nfloor: {floor['rounds']} rounds, {floor['phase_s']:.0f} s (minimal models built in "
              f"{floor['build_s']:.0f} s); our signatures fetch probabilities or heatmap only"
              + ("" if difference is None else f"; minimal vs our Grad-CAM heatmap, same image: max |diff| "
                 f"{difference:.1e} (large when the weights differ, e.g. random)"))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["python -m bench", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "model": str(run.version_dir),
        "rows": rows,
        "ratios": ratios,
        **({"floor": floor} if floor else {}),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    chart(rows, out / "latency.png")
    print(f"\nwrote {out / 'results.json'} and {out / 'latency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
