"""python -m export: export a Keras classifier with in-graph CAM / Grad-CAM signatures."""

from __future__ import annotations

import argparse
import sys

from export.backbone import PRECISIONS
from export.decode import DEFAULT_MAX_PIXELS
from export.methods import METHODS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    p.add_argument("--backbone", required=True, help="keras.applications name (resnet50, vgg16, ...) or a .keras file")
    p.add_argument("--weights", default="imagenet", help="imagenet, auto (imagenet, else random when offline), none (random) or a weights file")
    p.add_argument("--methods", default="gradcam",
                   help=f"comma list from {', '.join(METHODS)}, or all; the first is serving_default")
    p.add_argument("--model-name", required=True)
    p.add_argument("--base-path", default="models")
    p.add_argument("--version", type=int, help="version number (default: the next one)")
    p.add_argument("--target-layer", help="layer to explain (default: the last 4-D layer, found automatically)")
    p.add_argument("--target-layers", default="",
                   help="comma list of layers whose maps are fused (LayerCAM's fusion) in <method>_fused signatures")
    p.add_argument("--scorecam-channels", type=int, default=64,
                   help="scorecam scores the N most activated channels, one forward pass each (0: all)")
    p.add_argument("--ablationcam-channels", type=int, default=64,
                   help="ablationcam ablates the N most activated channels, one pass through the head each (0: all)")
    p.add_argument("--image-size", type=int, help="input size (default: the model's own)")
    p.add_argument("--preprocess", default="auto", help="auto, none, or a keras.applications name")
    p.add_argument("--labels", help="class names file, one per line")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--top-k-maps", type=int, default=0, help="also return heatmaps of the K top classes")
    p.add_argument("--feature-maps", type=int, default=36, help="most activated channels in feature_maps (0: no such signature)")
    p.add_argument("--precision", choices=list(PRECISIONS), default="float32",
                   help="type the backbone and head compute in (variables, explanation and outputs stay float32)")
    p.add_argument("--jit-compile", action="store_true", help="compile the signatures with XLA")
    p.add_argument("--warmup-batch-sizes", default="1,8", help="comma list of batch sizes for the warm-up records")
    p.add_argument("--max-batch-size", type=int, default=128, help="larger requests are refused")
    p.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="larger images are refused before decoding")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from export.savedmodel import export_savedmodel  # imports TensorFlow: after --help
    from export.verify import VerificationError

    try:
        export_savedmodel(
            backbone=args.backbone,
            weights=args.weights,
            methods=list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()],
            model_name=args.model_name,
            base_path=args.base_path,
            version=args.version,
            target_layer=args.target_layer,
            target_layers=[layer.strip() for layer in args.target_layers.split(",") if layer.strip()],
            scorecam_channels=args.scorecam_channels,
            ablationcam_channels=args.ablationcam_channels,
            image_size=args.image_size,
            preprocess=args.preprocess,
            labels=args.labels,
            top_k=args.top_k,
            jit_compile=args.jit_compile,
            warmup_batch_sizes=[int(b) for b in args.warmup_batch_sizes.split(",")],
            max_batch_size=args.max_batch_size,
            max_image_pixels=args.max_image_pixels,
            top_k_maps=args.top_k_maps,
            feature_maps=args.feature_maps,
            precision=args.precision,
        )
    except (ValueError, FileNotFoundError, FileExistsError, VerificationError) as error:
        print(f"export: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
