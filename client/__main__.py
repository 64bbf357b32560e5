"""Command line: `python -m client explain|predict IMAGE ... --server HOST:PORT --model NAME`, and
`python -m client web`, a page that explains the images dropped on it.

explain prints each image's top-k (rank, class, probability, as keras `decode_predictions`) and the
explained class, and writes `<out>/<stem>_<method>_overlay.png` (heatmap over the photo, at the
photo's size) and `<out>/<stem>_<method>_heatmap.png` (the heatmap alone, same size); for a method
whose signature has pictures of its own, also `<out>/<stem>_<method>_<picture>.png` each, same size
(Guided Grad-CAM's `guided_png_bytes`: `<stem>_guided_gradcam_guided.png`).
Exit status: 0 ok, 1 the server refused or failed, 2 bad arguments or unreadable files.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from . import web  # the page's HTTP side: the CLI's, while `import client` stays free of it
from .api import CamClient, CamServingError, Prediction, tls_credentials


def _credentials(args):
    """TLS credentials when --ca-cert or --client-cert/--client-key are given, else None (plaintext)."""
    if not (args.ca_cert or args.client_cert or args.client_key):
        return None
    return tls_credentials(args.ca_cert, args.client_cert, args.client_key)


def _client(args) -> CamClient:
    dims = [int(v) for v in args.image_size.split(",")] if args.image_size else None
    return CamClient(args.server, model=args.model, timeout=args.timeout, version=args.version,
                     credentials=_credentials(args), image_size=(dims[0], dims[-1]) if dims else None)


def _inputs(args) -> list:
    """File bytes (sent as-is), or with --raw the RGB arrays OpenCV decodes (sent as BMP files: client/bmp.py)."""
    if not args.raw:
        return [Path(p).read_bytes() for p in args.images]
    from .overlay import read_image

    return [read_image(p)[:, :, ::-1].copy() for p in args.images]  # OpenCV BGR -> RGB


def _print(path: str, result: Prediction, method: str) -> None:
    print(f"{path}: {method} class {result.class_index} {result.class_label} (logit {result.score:.4f})")
    for rank, (label, prob) in enumerate(result.top_k, 1):
        print(f"  {rank:2d}. {label:<32s} {prob:.4f}")


def cmd_predict(args) -> int:
    with _client(args) as client:
        results = client.predict(_inputs(args), top_k=args.top_k)
    for path, result in zip(args.images, results):
        _print(path, result, "predict")
    return 0


def cmd_explain(args) -> int:
    from . import overlay

    with _client(args) as client:
        results = client.explain(_inputs(args), method=args.method, class_index=args.class_index,
                                 top_k=args.top_k, heatmap="float" if args.float_heatmap else "png")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stems: set[str] = set()
    for path, result in zip(args.images, results):
        _print(path, result, args.method)
        stem = Path(path).stem
        while stem in stems:  # a.jpg and other/a.jpg must not overwrite each other
            stem += "_"
        stems.add(stem)
        try:
            image = overlay.read_image(path)
        except ValueError:  # e.g. a GIF the server decodes and OpenCV does not: map at model size
            print(f"  warning: OpenCV cannot decode {path}; heatmap written at model size", file=sys.stderr)
            overlay.write_png(out / f"{stem}_{args.method}_heatmap.png", overlay.colorize(result.heatmap))
            continue
        size = (image.shape[1], image.shape[0])
        blend_path, heat_path = out / f"{stem}_{args.method}_overlay.png", out / f"{stem}_{args.method}_heatmap.png"
        overlay.write_png(blend_path, overlay.overlay(image, result.heatmap, args.alpha))
        overlay.write_png(heat_path, overlay.colorize(result.heatmap, size))
        print(f"  -> {blend_path}  {heat_path}")
        for name, picture in result.pictures.items():
            picture_path = out / f"{stem}_{args.method}_{name}.png"
            overlay.write_png(picture_path, overlay.resized(picture[:, :, ::-1], size))
            print(f"  -> {picture_path}")
        if args.feature_grid:
            with _client(args) as client:
                maps, channels = client.feature_maps(Path(path).read_bytes())
            grid_path = out / f"{stem}_feature_grid.png"
            overlay.write_png(grid_path, overlay.feature_grid(image, maps, channels))
            print(f"  -> {grid_path} (channels {', '.join(str(int(c)) for c in channels[:6])}, ...)")
    return 0


def cmd_evaluate(args) -> int:
    from . import evaluate

    paths = []
    for item in args.images:
        if Path(item).is_dir():
            paths += sorted(str(p) for p in Path(item).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        else:
            paths.append(item)
    with _client(args) as client:
        methods = client.explain_methods() if args.methods == "all" else [m for m in args.methods.split(",") if m]
        per_image = evaluate.score_images(client, paths, methods, args.steps)
    print(f"{len(paths)} images, {args.steps} steps; mean over the images:")
    print(evaluate.table({method: evaluate.mean(scores) for method, scores in per_image.items()}))
    if args.per_image:
        for i, path in enumerate(paths):
            print(f"\n{path}:")
            print(evaluate.table({method: scores[i] for method, scores in per_image.items()}))
    return 0


def cmd_wait(args) -> int:
    with CamClient(args.server, model=args.model, timeout=5.0, credentials=_credentials(args)) as client:
        client.wait_until_ready(args.timeout)
    print(f"{args.server} serves {args.model}")
    return 0


def cmd_web(args) -> int:
    limits = web.PageLimits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                            max_concurrent=args.max_concurrent)
    with _client(args) as client:
        server = web.make_server(web.ExplainPage(client, limits), args.host, args.port)
        host, port = server.server_address[:2]
        print(f"Explain page for model {args.model} at {args.server}: http://{host}:{port}/ (Ctrl-C stops it)",
              flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):  # also when started where SIGINT is ignored (`cmd &`)
            signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown).start())
        server.serve_forever()
        server.server_close()
    return 0


SERVER_HELP = ("gRPC address: HOST:PORT, replicas as HOST:PORT,HOST:PORT,... or dns:///NAME:PORT (calls spread "
               "round-robin, retried on another replica when one is unavailable); default $CAMSERVE_SERVER "
               "or localhost:8500")


def build_parser() -> argparse.ArgumentParser:
    # Every command talks to one model on one server; those that explain also pin a version and a deadline.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--server", default=os.environ.get("CAMSERVE_SERVER", "localhost:8500"),
                            help=SERVER_HELP)
    connection.add_argument("--model", default="efficientnet_lite0_cam", help="model name on the server")
    connection.add_argument("--ca-cert", default=None, help="PEM root certificate that signed the server's: use TLS")
    connection.add_argument("--client-cert", default=None, help="PEM client certificate, for a server that requires "
                            "one (mutual TLS); with --client-key")
    connection.add_argument("--client-key", default=None, help="PEM private key of --client-cert")
    calls = argparse.ArgumentParser(add_help=False, parents=[connection])
    calls.add_argument("--version", type=int, default=None, help="model version (default: latest)")
    calls.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    common = argparse.ArgumentParser(add_help=False, parents=[calls])
    common.add_argument("images", nargs="+", metavar="IMAGE", help="JPEG/PNG/BMP files")
    common.add_argument("--top-k", type=int, default=5, help="classes to print")
    common.add_argument("--raw", action="store_true",
                        help="decode here and send the pixels (as BMP files, lossless) instead of the encoded files")
    common.add_argument("--image-size", default=None, metavar="H[,W]",
                        help="model input size, at which evaluate masks the images (default: asked from the server)")

    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    explain = sub.add_parser("explain", parents=[common], help="top-k, heatmap and overlay pictures")
    explain.add_argument("--method", default="gradcam",
                         help="any method the model was exported with, <method>_fused and <method>_smooth "
                              "included (README: Methods)")
    explain.add_argument("--class-index", type=int, default=None, help="class to explain (default: top-1)")
    explain.add_argument("--out", default="out", help="directory for the PNGs")
    explain.add_argument("--alpha", type=float, default=0.4, help="heatmap weight in the overlay")
    explain.add_argument("--feature-grid", action="store_true",
                         help="also write the most activated feature maps as a grid (<stem>_feature_grid.png)")
    explain.add_argument("--float-heatmap", action="store_true", help="fetch the float32 heatmap, not the 8-bit PNG")
    explain.set_defaults(func=cmd_explain)
    sub.add_parser("predict", parents=[common], help="top-k only").set_defaults(func=cmd_predict)
    evaluate = sub.add_parser("evaluate", parents=[common],
                              help="deletion/insertion AUC and drop at 20%% per method vs a random map")
    evaluate.add_argument("--methods", default="gradcam,cam",
                          help="comma list of explain signatures, or all (every one the model has)")
    evaluate.add_argument("--per-image", action="store_true", help="also a table for each image")
    evaluate.add_argument("--steps", type=int, default=10, help="deletion/insertion steps")
    evaluate.set_defaults(func=cmd_evaluate)
    wait = sub.add_parser("wait", parents=[connection], help="wait until the server serves the model")
    wait.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")
    wait.set_defaults(func=cmd_wait)
    page = sub.add_parser("web", parents=[calls], help="a page on 127.0.0.1 that explains the images dropped on it")
    page.add_argument("--host", default="127.0.0.1",
                      help="address the page listens on; it has no login: see docs/OPERATIONS.md before widening it")
    page.add_argument("--port", type=int, default=8080, help="the page's port (0: any free port)")
    limits = web.PageLimits()
    page.add_argument("--max-upload-mb", type=float, default=limits.max_upload_bytes / 2**20,
                      help="largest file accepted, MiB (default %(default)g)")
    page.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                      help="largest image accepted, in pixels, read from its header before decoding "
                      "(default %(default)d)")
    page.add_argument("--max-concurrent", type=int, default=limits.max_concurrent,
                      help="explanations running at once; more get 429 (default %(default)d)")
    page.set_defaults(func=cmd_web, image_size=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= getattr(args, "alpha", 0.0) <= 1.0:
        parser.error("--alpha must be in [0, 1]")
    try:
        return args.func(args)
    except CamServingError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
