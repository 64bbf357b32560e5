"""`--smooth eigen` and `--smooth aug` (`<method>_smooth` signatures) against references written here:
pytorch-grad-cam's eigen_smooth projection in numpy, and the four views of aug_smooth made with cv2 and
explained eagerly with Keras."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

import eager
import synthetic

ZOOMED = round(synthetic.SIZE * 1.25)  # the zoomed views: the image resized to 80x80, its central 64x64
OFFSET = (ZOOMED - synthetic.SIZE) // 2


def pytorch_grad_cam_projection(weighted: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam's get_2d_projection of one image's weighted activations, in its layout (channels
    first): centred over the positions, projected on the first right singular vector."""
    channels_first = weighted.transpose(2, 0, 1)
    reshaped = channels_first.reshape(channels_first.shape[0], -1).transpose()
    reshaped = reshaped - reshaped.mean(axis=0)
    _, _, vt = np.linalg.svd(reshaped, full_matrices=True)
    return (reshaped @ vt[0, :]).reshape(channels_first.shape[1:])


def eigen_map(weighted: np.ndarray) -> np.ndarray:
    """Our eigen_smooth: pytorch-grad-cam's projection with the sign (arbitrary in an SVD) that makes it
    correlate positively with the channel sum, the map it replaces."""
    projection = pytorch_grad_cam_projection(weighted)
    if np.corrcoef(projection.ravel(), weighted.sum(axis=-1).ravel())[0, 1] < 0:
        projection = -projection
    return projection


def principal_weights(a: np.ndarray) -> np.ndarray:
    """EigenCAM's channel weights: the first principal direction of A, signed like the channel sum."""
    flat = a.reshape(-1, a.shape[-1])
    _, _, vt = np.linalg.svd(flat - flat.mean(axis=0), full_matrices=False)
    return vt[0] if np.corrcoef(flat @ vt[0], flat.sum(axis=1))[0, 1] >= 0 else -vt[0]


WEIGHTED = {  # w_k A_k of one image, [h, w, K]
    "gradcam": lambda a, g: a * g.mean(axis=(0, 1)),
    "hirescam": lambda a, g: a * g,
    "layercam": lambda a, g: a * np.maximum(g, 0),
    "eigencam": lambda a, g: a * principal_weights(a),
}


def _export(build_once, shapes_model, name: str, methods: list[str], smooth: tuple[str, ...], **options):
    folder = build_once(name, lambda f: synthetic.export_model(
        shapes_model, methods, name, f, smooth=smooth, warmup_batch_sizes=(1,), feature_maps=0, **options))
    return folder / name / "1"


@pytest.fixture(scope="module")
def eigen_export(build_once, shapes_model):
    return _export(build_once, shapes_model, "eigen", ["gradcam", "hirescam", "eigencam"], ("eigen",), top_k_maps=2)


@pytest.fixture(scope="module")
def aug_exports(build_once, shapes_model):
    """{smoothings: export}: aug alone, and aug with eigen."""
    return {("aug",): _export(build_once, shapes_model, "aug", ["gradcam", "layercam"], ("aug",)),
            ("aug", "eigen"): _export(build_once, shapes_model, "aug_eigen", ["gradcam"], ("aug", "eigen"))}


@pytest.fixture(scope="module")
def shapes_keras(shapes_model):
    return eager.logits_model(shapes_model)


def _channel_sum(weighted: np.ndarray) -> np.ndarray:
    return weighted.sum(axis=-1)


@pytest.mark.parametrize("method", ["gradcam", "hirescam", "eigencam"])
def test_eigen_smooth_is_pytorch_grad_cams_projection(eigen_export, load, shapes_model, shapes_keras, method):
    images, _, _ = synthetic.dataset(6, seed=31)
    class_index = np.array([-1, 0, 1, 2, -1, 1], np.int32)
    targets, _, _ = eager.evidence(shapes_keras, "last_conv", images, class_index)
    model = load(eigen_export)
    smooth = model.signatures[f"{method}_smooth"](images=images, class_index=class_index)
    plain = model.signatures[method](images=images, class_index=class_index)
    np.testing.assert_array_equal(smooth["class_index"].numpy(), targets)
    np.testing.assert_allclose(smooth["probabilities"].numpy(), plain["probabilities"].numpy(), atol=1e-6)

    def maps(combine):
        def formula(run):
            _, a, g = run.evidence("last_conv", images, class_index)
            return np.stack([eager.normalised(combine(WEIGHTED[method](a[i], g[i]))) for i in range(len(images))])

        return formula

    # and the unsmoothed signature is the channel sum: the two differ, so this test can tell them apart
    for out, combine in ((smooth, eigen_map), (plain, _channel_sum)):
        expected, tolerance = eager.reference(maps(combine), shapes_model)
        eager.assert_within(out["heatmap_lowres"].numpy(), expected, tolerance, f"{method} {combine.__name__}")
    assert np.abs(smooth["heatmap_lowres"].numpy() - plain["heatmap_lowres"].numpy()).max() > 0.05


def test_eigen_smooth_top_k_maps_equal_single_class_calls(eigen_export, load):
    model = load(eigen_export)
    images, _, _ = synthetic.dataset(3, seed=32)
    out = model.signatures["gradcam_smooth"](images=images, class_index=np.full(3, -1, np.int32))
    classes = out["heatmaps_class_index"].numpy()
    for j in range(2):
        single = model.signatures["gradcam_smooth"](images=images, class_index=classes[:, j].astype(np.int32))
        np.testing.assert_allclose(out["heatmaps"].numpy()[:, j], single["heatmap"].numpy(), atol=1e-5)


def _views(image: np.ndarray) -> list[np.ndarray]:
    """The four views of aug_smooth, made with cv2: the image, its mirror, both zoomed 1.25x about the centre."""
    image = image.astype(np.float32)
    zoomed = cv2.resize(image, (ZOOMED, ZOOMED))[OFFSET:OFFSET + synthetic.SIZE, OFFSET:OFFSET + synthetic.SIZE]
    return [image, image[:, ::-1], zoomed, zoomed[:, ::-1]]


def _back(heat: np.ndarray) -> np.ndarray:
    """A zoomed view's map in the image's frame: zero where the view did not see it."""
    canvas = np.zeros((ZOOMED, ZOOMED), np.float32)
    canvas[OFFSET:OFFSET + synthetic.SIZE, OFFSET:OFFSET + synthetic.SIZE] = heat
    return cv2.resize(canvas, (synthetic.SIZE, synthetic.SIZE))


@pytest.mark.parametrize("method, smoothings", [("gradcam", ("aug",)), ("layercam", ("aug",)),
                                                ("gradcam", ("aug", "eigen"))])
def test_aug_smooth_averages_the_four_views_explained_eagerly(aug_exports, load, shapes_model, shapes_keras, method,
                                                             smoothings):
    images, _, _ = synthetic.dataset(4, seed=33)
    class_index = np.array([-1, 0, 2, -1], np.int32)
    out = load(aug_exports[smoothings]).signatures[f"{method}_smooth"](images=images, class_index=class_index)
    targets, _, _ = eager.evidence(shapes_keras, "last_conv", images, class_index)
    np.testing.assert_array_equal(out["class_index"].numpy(), targets)
    combine = eigen_map if "eigen" in smoothings else _channel_sum

    def heatmaps(run):
        heat = []
        for i, image in enumerate(images):
            target, _, _ = run.evidence("last_conv", image[None], class_index[i:i + 1])
            views = np.stack(_views(image))  # every view explains the class the image itself explains
            _, a, g = run.evidence("last_conv", views, np.repeat(target, 4))
            maps = [eager.resized(eager.normalised(combine(WEIGHTED[method](a[v], g[v]))), synthetic.SIZE)
                    for v in range(4)]
            total = maps[0] + maps[1][:, ::-1] + _back(maps[2]) + _back(maps[3][:, ::-1])
            coverage = 2 + 2 * _back(np.ones_like(maps[0]))
            heat.append(eager.normalised(total / coverage))
        return np.stack(heat)

    expected, tolerance = eager.reference(heatmaps, shapes_model)
    eager.assert_within(out["heatmap"].numpy(), expected, tolerance, f"{method} {'+'.join(smoothings)}")


def test_aug_smooth_of_the_mirror_image_is_the_mirrored_map(aug_exports, load):
    """The four views of a mirror image are those of the image, so its map is the mirrored map."""
    model = load(aug_exports[("aug",)])
    images, _, _ = synthetic.dataset(4, seed=34)
    class_index = np.array([0, 1, 2, 1], np.int32)
    smooth = model.signatures["gradcam_smooth"]
    direct = smooth(images=images, class_index=class_index)["heatmap"].numpy()
    mirrored = smooth(images=images[:, :, ::-1].copy(), class_index=class_index)["heatmap"].numpy()
    np.testing.assert_allclose(mirrored, direct[:, :, ::-1], atol=1e-5)
    plain = model.signatures["gradcam"]
    unsmoothed = plain(images=images, class_index=class_index)["heatmap"].numpy()
    unsmoothed_mirrored = plain(images=images[:, :, ::-1].copy(), class_index=class_index)["heatmap"].numpy()
    assert np.abs(unsmoothed_mirrored - unsmoothed[:, :, ::-1]).max() > 0.05  # one view alone is not symmetric


def test_smooth_names_its_choices():
    from camserve.export.options import ExportOptions

    with pytest.raises(ValueError, match="--smooth 'gauss': choose from aug, eigen"):
        ExportOptions(backbone="b", model_name="m", smooth="gauss")
    assert ExportOptions(backbone="b", model_name="m", smooth="aug").smooth == ("aug",)
