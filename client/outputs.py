"""The signatures and outputs the client calls by default: one place for the client, the CLI, the page
and the export.

TF Serving's session builds an executor (Grappler over the whole graph: docs/BENCHMARKS.md "Start-up and
export") for each distinct set of fed and fetched tensors, at the first call that uses it. So every
call our callers make by default runs on one: `explain_bytes`, each row naming its method (`predict`
for the prediction alone; arrays go as BMP files: client/bmp.py), fetching the one output set named
here; `explain_smooth_bytes` and `explain_fused_bytes` for the variants of --smooth and --target-layers.
The exporter's warm-up builds exactly these (export/warmup.py), and `<name>_compact` returns exactly
that set, for REST clients, which cannot choose outputs. Any other set pays its executor build once, at
its first call.
"""
from __future__ import annotations

from typing import Collection, Mapping

EXPLAIN_SIGNATURE = "explain"  # every method of the model, named per row by its `method` input
EXPLAIN_BYTES = f"{EXPLAIN_SIGNATURE}_bytes"
METHOD_INPUT = "method"
PREDICT = "predict"  # the `method` of a row that asks for the prediction alone (no map, an empty PNG)
VARIANT_SUFFIXES = ("_smooth", "_fused")  # <method>_smooth: explain_smooth_bytes's method, ...
SUMMARY = ["class_index", "class_label", "score", "top_k_indices", "top_k_labels", "top_k_scores", "error"]
HEATMAP_PNG = "heatmap_png_bytes"
EXPLAIN = [*SUMMARY, HEATMAP_PNG]  # labels, scores and the heatmap as a PNG: the compact answer
PICTURE_SUFFIX = "_png_bytes"


def pictures(outputs: Collection[str]) -> list[str]:
    """A method's pictures of its own besides the heatmap (Guided Grad-CAM's `guided_png_bytes`): what a
    signature declares is what the client, the CLI and the page fetch and show, whatever the method."""
    return sorted(o for o in outputs if o.endswith(PICTURE_SUFFIX) and o != HEATMAP_PNG)


def picture_name(output: str) -> str:
    """A picture's name, its output's less the suffix: `guided` for `guided_png_bytes`."""
    return output.removesuffix(PICTURE_SUFFIX)


def default_outputs(outputs: Collection[str]) -> list[str] | None:
    """The output_filter a signature with these outputs gets from the client, CLI and page by default:
    the summary, the PNG heatmap and every picture of an explain signature; the summary of predict; none
    of any other (feature_maps, a debug view: `CamClient.feature_maps`, `--feature-grid`)."""
    if HEATMAP_PNG in outputs:
        return [*EXPLAIN, *pictures(outputs)]
    if set(SUMMARY) <= set(outputs):
        return SUMMARY
    return None


def explained_methods(signature_defs: Mapping) -> dict[str, tuple[str, str | None]]:
    """Each explain method among SignatureDefs (name -> SignatureDef) -> the signature the client calls
    for it and the `method` it sends: (`explain_bytes`, "gradcam") for gradcam, (`explain_smooth_bytes`,
    "gradcam") for gradcam_smooth; (`gradcam_bytes`, None) on a model exported without the families. A
    method is a `<method>_bytes` signature that takes a class_index and returns a heatmap PNG."""
    found = {}
    for name, signature in sorted(signature_defs.items()):
        if not name.endswith("_bytes") or METHOD_INPUT in signature.inputs:
            continue
        if "class_index" in signature.inputs and HEATMAP_PNG in signature.outputs:
            method = name.removesuffix("_bytes")
            variant = next((s for s in VARIANT_SUFFIXES if method.endswith(s)), "")
            family = f"{EXPLAIN_SIGNATURE}{variant}_bytes"
            found[method] = (family, method.removesuffix(variant)) if family in signature_defs else (name, None)
    return found
