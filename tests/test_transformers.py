"""Vision transformers explained through their tokens: small Keras ViTs (`vit` of tests/testdata/make_testdata.py,
its files there) for the synthetic shapes, exported with every method, run through TF Serving's loader and
compared with eager references that lay the patch tokens out as their grid here."""

from __future__ import annotations

import numpy as np
import pytest

import eager
import synthetic
from calls import run_method
from camserve.export.methods import METHODS
from camserve.serving.servables.session import SavedModelSession
from test_methods import REFERENCES

GRID = synthetic.SIZE // 8  # 8x8 patches of 8x8 pixels
# The class-token ViT's head reads the class token alone, so CAM (pooling + dense) does not apply.
CLASS_HEAD_METHODS = [m for m in METHODS if m != "cam"]
# LayerCAM finds the object on the class-token ViT of tests/testdata (89 % of 100 held-out images); the
# channel-weighting methods do not (Grad-CAM 12 %; why: docs/BENCHMARKS.md, "Transformers"), and HiResCAM
# is zero there (test_hirescam_is_zero_where_tokens_reach_the_score_through_a_norm_only).
POINTING = {"layercam": 0.75}


@pytest.fixture(scope="module")
def vits(build_once):
    """head -> (the .keras file in tests/testdata, its export, the export's log): "class", trained on the shapes,
    exported with every method that applies; "mean" (a head on the mean of the tokens), untrained, with
    gradcam and cam."""
    def build(folder, head):
        log = []
        synthetic.export_model(synthetic.TESTDATA / f"vit_{head}.keras",
                               CLASS_HEAD_METHODS if head == "class" else ["gradcam", "cam"], "vit", folder,
                               warmup_batch_sizes=(1,), feature_maps=8, log=log.append)
        (folder / "log.txt").write_text("\n".join(log))

    built = {}
    for head in ("class", "mean"):
        folder = build_once(f"vit_{head}", lambda f, head=head: build(f, head))
        built[head] = synthetic.TESTDATA / f"vit_{head}.keras", folder / "vit" / "1", (folder / "log.txt").read_text()
    return built


def _grid(tokens: np.ndarray, prefix: int) -> np.ndarray:
    """[N, T, C] -> the patch tokens as [N, 8, 8, C], written here as pytorch-grad-cam's reshape_transform."""
    return tokens[:, prefix:, :].reshape(len(tokens), GRID, GRID, tokens.shape[-1])


def _formula(method: str, layer: str, prefix: int, images: np.ndarray, class_index: np.ndarray):
    """eager.reference's formula: `method`'s map of tests/test_methods.py on a run's evidence laid out as the grid."""
    def maps(run):
        targets, a, g = run.evidence(layer, images, class_index)
        a, g = _grid(a, prefix), _grid(g, prefix)
        kernel = run.model.get_layer("predictions").kernel.numpy().astype(np.float64)
        return np.stack([eager.normalised(REFERENCES[method](a[i], g[i], kernel[:, targets[i]]))
                         for i in range(len(images))])

    return maps


@pytest.mark.parametrize("head, layer, prefix", [("class", "block1_output", 1), ("mean", "encoder_norm", 0)])
def test_the_default_target_layer_is_the_last_whose_patch_tokens_reach_the_score(vits, head, layer, prefix):
    """A head on the class token: the final norm's patch tokens do not reach the score, so the last block's
    input; a head on the mean of the tokens: the final norm."""
    grid = f"{prefix} prefix token + " if prefix else ""
    assert f"target layer {layer!r} ({GRID * GRID + prefix}, 32) ({grid}a {GRID}x{GRID} grid of patch tokens)" \
        in vits[head][2]


@pytest.mark.parametrize("head", ["class", "mean"])
def test_every_method_matches_its_formula_on_the_token_grid(vits, head):
    """Grad-CAM and the other gradient methods, through TF Serving's loader, against the formulas of
    tests/test_methods.py applied to the eager evidence laid out as the grid here, within the tolerance
    float32 leaves each formula (eager.reference; Grad-CAM++'s is the widest: 2g² + ΣA·g³ nearly vanishes)."""
    keras_file, export, _ = vits[head]
    layer, prefix = ("block1_output", 1) if head == "class" else ("encoder_norm", 0)
    images, _, _ = synthetic.dataset(4, seed=41)
    class_index = np.array([-1, 0, 1, 2], np.int32)
    targets, _, _ = eager.evidence(eager.logits_model(keras_file), layer, images, class_index)
    # HiResCAM's map on the class-token ViT is rounding noise normalised: it has no reference to equal.
    methods = [m for m in REFERENCES if m not in ("cam", "hirescam")] if head == "class" else ["gradcam", "cam"]
    with SavedModelSession(export) as session:
        for method in methods:
            out = run_method(session, method, {"images": images, "class_index": class_index},
                             ["heatmap_lowres", "class_index"])
            np.testing.assert_array_equal(out["class_index"], targets)
            expected, tolerance = eager.reference(_formula(method, layer, prefix, images, class_index), keras_file)
            eager.assert_within(out["heatmap_lowres"], expected, tolerance, method)


def test_pointing_game_through_tf_servings_loader(vits):
    """Every method runs on the class-token ViT's grid; those of POINTING put the peak inside the object."""
    _, export, _ = vits["class"]
    images, labels, boxes = synthetic.dataset(100, seed=22)
    scores = {}
    with SavedModelSession(export) as session:
        for method in CLASS_HEAD_METHODS:
            out = run_method(session, method, {"images": images, "class_index": labels.astype(np.int32)},
                             ["heatmap"])
            assert out["heatmap"].shape == (100, synthetic.SIZE, synthetic.SIZE)
            scores[method] = float(synthetic.pointing_hits(out["heatmap"], boxes).mean())
    print("pointing game, class-token ViT: " + ", ".join(f"{m} {s:.0%}" for m, s in scores.items()))
    for method, floor in POINTING.items():
        assert scores[method] >= floor, (method, scores)


def test_cam_needs_a_head_that_pools_the_tokens(vits, tmp_path):
    with pytest.raises(ValueError, match="needs a head of global average pooling"):
        synthetic.export_model(vits["class"][0], ["cam"], "refused", tmp_path)


def test_cam_over_pooled_tokens_is_the_dense_kernel_weighting(vits):
    """The mean-head ViT's CAM against numpy, and equal to its Grad-CAM (a pooling + dense head)."""
    keras_file, export, _ = vits["mean"]
    images, _, _ = synthetic.dataset(3, seed=42)
    class_index = np.array([-1, 1, 2], np.int32)
    with SavedModelSession(export) as session:
        maps = {m: session.run_signature(m, {"images": images, "class_index": class_index}, ["heatmap_lowres"])
                for m in ("cam", "gradcam")}
    expected, tolerance = eager.reference(_formula("cam", "encoder_norm", 0, images, class_index), keras_file)
    eager.assert_within(maps["cam"]["heatmap_lowres"], expected, tolerance, "cam")
    np.testing.assert_allclose(maps["cam"]["heatmap_lowres"], maps["gradcam"]["heatmap_lowres"], atol=1e-4)


def test_a_layer_whose_patch_tokens_do_not_reach_the_score_is_refused(vits):
    from camserve.export.backbone import load_backbone

    with pytest.raises(ValueError, match="does not depend on the patch tokens of 'encoder_norm'"):
        load_backbone(str(vits["class"][0]), "none", target_layer="encoder_norm")
    with pytest.raises(ValueError, match="--token-grid 4x4 leaves 49 of the target layer's 65 tokens before the grid"):
        load_backbone(str(vits["class"][0]), "none", target_layer="block1_output", token_grid_size="4x4")
    split = load_backbone(str(vits["class"][0]), "none", target_layer="block1_output", token_grid_size="8x8")
    assert (split.token_grid.prefix, split.token_grid.height) == (1, 8)


def test_hirescam_is_zero_where_tokens_reach_the_score_through_a_norm_only(vits):
    """In a pre-norm ViT with a head on the class token, the patch tokens of a block's output reach the
    score only through the next block's LayerNormalization, which is invariant to scaling its input: each
    token's gradient is orthogonal to the token, so Σ_k ∂y/∂A_k A_k (HiResCAM's map) is zero. The exporter
    says so; it does not for the mean-head ViT's final norm, whose tokens reach the pooling directly."""
    model = eager.logits_model(vits["class"][0])
    images, _, _ = synthetic.dataset(4, seed=43)
    _, a, g = eager.evidence(model, "block1_output", images, np.full(4, -1, np.int32))
    a, g = _grid(a, 1), _grid(g, 1)
    cosine = (a * g).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(g, axis=-1))
    assert np.abs(cosine).max() < 1e-4
    assert np.abs(np.maximum(g, 0) * a).sum(-1).max() > 1e-3 * np.abs(g * a).sum(-1).max() + 1e-9  # LayerCAM is not
    note = "reach the score only through layer normalisation"
    assert note in vits["class"][2] and note not in vits["mean"][2]
