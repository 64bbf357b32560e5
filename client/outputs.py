"""The outputs the client asks for by default: one place for the client, the CLI, the page and the export.

TF Serving's session builds an executor (Grappler over the whole graph, ~1-2 s for ResNet50 on a
CPU) for each distinct set of fetched tensors, at the first call that fetches it. The exporter
writes one warm-up request for each set named here (export/savedmodel.py), so the calls that
`CamClient`, `python -m client` and the explain page make by default are warm when the server says
it is ready; the `<method>_compact` signatures return exactly the explain set, for REST clients,
which cannot choose outputs. Any other set pays its executor build once, at its first call.
"""
from __future__ import annotations

from typing import Collection

SUMMARY = ["class_index", "class_label", "score", "top_k_indices", "top_k_scores", "top_k_labels", "error"]
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


def default_output_sets(outputs: Collection[str]) -> list[list[str]]:
    """The output_filters a signature with these outputs gets from the client, CLI and page by
    default: the summary and the PNG heatmap of an explain signature (and with all its pictures
    besides, as the CLI and the page ask for them), the summary of predict; none of any other
    (feature_maps, a debug view: `CamClient.feature_maps`, `--feature-grid`)."""
    if HEATMAP_PNG in outputs:
        own = pictures(outputs)
        return [EXPLAIN, [*EXPLAIN, *own]] if own else [EXPLAIN]
    if set(SUMMARY) <= set(outputs):
        return [SUMMARY]
    return []
