"""TensorFlow Serving's own code path: C++ LoadSavedModel + Session::Run through TF's C API.

What TF Serving does with a model (serving/servables/session.py): load the MetaGraph tagged `serve`,
restore variables with the saver, replay the warm-up file, and answer a request with one
Session::Run on the SignatureDef's tensor names. These tests check the exporter's proof of that path,
the fetch list, and the input contract the graph enforces itself (TF Serving checks no shapes); every
signature of every export is run that way in tests/test_every_signature.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import synthetic
from camserve.serving.servables.session import SavedModelSession, SessionError

# Session::Run and the TF2 function runtime run the same kernels. Floats may move in the last bits
# where a graph rewrite differs (serving/session_cpu.config leaves out arithmetic simplification and
# constant folding: up to 4e-6 on EfficientNet-Lite0's outputs) or changes a summation order; a
# rounded uint8 heatmap by one level then.
FLOAT_ATOL = 1e-5
INVALID_ARGUMENT, FAILED_PRECONDITION = 3, 9


def test_output_filter_is_the_fetch_list(shapes_export, load):
    images, _, _ = synthetic.dataset(2, seed=31)
    inputs = {"images": images, "class_index": np.array([-1, 1], np.int32)}
    with SavedModelSession(shapes_export) as session:
        served = session.run_signature("gradcam", inputs, ["heatmap_png_bytes", "class_label"])
    assert set(served) == {"heatmap_png_bytes", "class_label"}
    expected = load(shapes_export).signatures["gradcam"](**inputs)
    assert served["class_label"].tolist() == expected["class_label"].numpy().tolist()


def test_a_model_tf_servings_loader_cannot_restore_is_refused_and_not_published(shapes_model, tmp_path, monkeypatch):
    """A SavedModel whose variables the saver does not restore (saved without its restore op here; as when
    the explainer itself was saved, its Keras layers held by a tf.Module, untracked by the saver) runs in
    TF2's loader, which restores from the object graph, and not in TF Serving's: the exporter's check must
    catch it and leave no version behind."""

    from camserve.export.verify import VerificationError

    save = tf.saved_model.save

    def without_saver(*args, **kwargs):
        return save(*args, **{**kwargs, "options": tf.saved_model.SaveOptions(experimental_skip_saver=True)})

    monkeypatch.setattr(tf.saved_model, "save", without_saver)
    with pytest.raises(VerificationError, match="Could not find variable") as caught:
        synthetic.export_model(shapes_model, ["gradcam"], "old", tmp_path, warmup_batch_sizes=(1,))
    assert "TensorFlow Serving's loader cannot run signature" in str(caught.value)
    assert list((tmp_path / "old").iterdir()) == []  # neither a version nor the staging directory


def test_the_exporter_prints_the_verification_line(shapes_model, tmp_path):

    lines = []
    synthetic.export_model(shapes_model, ["gradcam"], "m", tmp_path, warmup_batch_sizes=(1, 2), log=lines.append)
    (line,) = [line for line in lines if "verified with TensorFlow Serving's loader" in line]
    # explain_bytes with a row of gradcam and a prediction, a prediction alone, then at batch 1 and 2;
    # explain_compact runs its tensors.
    assert "(LoadSavedModel + Session::Run): 4 warm-up requests and every output of 1 aliases" in line


# --- the input contract, enforced by the graph under Session::Run ----------------------------


@pytest.fixture(scope="module")
def session(shapes_export):
    with SavedModelSession(shapes_export) as s:
        yield s


def run_error(session, signature: str, **inputs) -> SessionError:
    with pytest.raises(SessionError) as caught:
        session.run_signature(signature, inputs)
    return caught.value


@pytest.mark.parametrize(
    "shape",
    [(2, 63, 64, 3), (2, 64, 65, 3), (2, 64, 64, 4), (2, 64, 64, 1), (64, 64, 3), (2, 64, 64, 3, 2), (2, 4096, 3), ()],
)
def test_wrong_image_shapes_are_refused_by_the_graph(session, shape):
    bad = np.zeros(shape, np.uint8)
    for signature, extra in (("predict", {}), ("gradcam", {"class_index": np.full(2, -1, np.int32)})):
        error = run_error(session, signature, images=bad, **extra)
        assert error.code == INVALID_ARGUMENT
        got = ",".join(str(d) for d in shape)
        assert f"images: expected shape [N,64,64,3] (N RGB images of 64x64, uint8), got [{got}]" in error.message


def test_image_bytes_must_be_a_vector(session):
    error = run_error(session, "predict_bytes", image_bytes=np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object))
    assert error.code == INVALID_ARGUMENT
    assert "image_bytes: expected shape [N] (one encoded image per element), got [2,2]" in error.message


def test_batch_limits_and_class_index_length_are_refused_by_the_graph(session):
    empty = run_error(session, "gradcam", images=np.zeros((0, 64, 64, 3), np.uint8), class_index=np.zeros(0, np.int32))
    assert empty.code == INVALID_ARGUMENT and "empty batch: send at least one image" in empty.message
    too_many = run_error(session, "predict", images=np.zeros((129, 64, 64, 3), np.uint8))
    assert "too many images in one request: 129; the limit is 128" in too_many.message
    images, _, _ = synthetic.dataset(2, seed=3)
    short = run_error(session, "gradcam", images=images, class_index=np.array([0], np.int32))
    assert "class_index needs one entry per image: 2 images, class_index of shape [1]" in short.message


def test_wrong_dtype_and_unknown_signature(session):
    error = run_error(session, "predict", images=np.zeros((1, 64, 64, 3), np.float32))
    assert error.code == INVALID_ARGUMENT and "uint8" in error.message
    assert run_error(session, "nope", images=np.zeros((1, 64, 64, 3), np.uint8)).code == FAILED_PRECONDITION


# --- per-image faults: one row, not the batch ------------------------------------------------


def test_a_faulty_image_marks_its_row_and_the_others_are_computed(session, load, shapes_export):
    """What one batch of TF Serving holds when one caller's image is bad: the other rows are
    exactly what they would be alone, the bad row says why."""
    images, _, _ = synthetic.dataset(4, seed=17)
    good = [tf.io.encode_png(image).numpy() for image in images]
    bad = {
        1: b"GIF89a" + bytes(40),
        2: good[2][: len(good[2]) // 2],  # truncated: the decoder fails on it
        3: b"",
    }
    batch = np.array([bad.get(i, g) for i, g in enumerate(good)], dtype=object)
    classes = np.array([-1, -1, -1, -1], np.int32)
    out = session.run_signature("gradcam_bytes", {"image_bytes": batch, "class_index": classes})
    errors = [e.decode() for e in out["error"]]
    assert errors[0] == ""
    assert errors[1].startswith("image_bytes: GIF images are not accepted")
    assert errors[2] == "image_bytes: the image cannot be decoded (corrupt or truncated?)"
    assert errors[3] == "image_bytes: an image is empty (0 bytes)"
    alone = load(shapes_export).signatures["gradcam"](images=images[:1], class_index=classes[:1])
    np.testing.assert_allclose(out["heatmap"][0], alone["heatmap"].numpy()[0], atol=FLOAT_ATOL)
    assert out["class_index"][0] == alone["class_index"].numpy()[0]


def test_an_out_of_range_class_marks_its_row(session):
    images, _, _ = synthetic.dataset(3, seed=19)
    out = session.run_signature("gradcam", {"images": images, "class_index": np.array([0, 3, -2], np.int32)})
    assert out["error"][0] == b""
    for row, value in ((1, 3), (2, -2)):
        assert out["error"][row].decode() == (
            f"class_index {value} is out of range: this model has 3 classes (0..2; -1 = the predicted class)"
        )
        assert out["class_index"][row] == np.argmax(out["logits"][row])  # computed for the predicted class
    assert out["class_index"][0] == 0


def test_a_call_whose_images_are_all_faulty_fails(session):
    images, _, _ = synthetic.dataset(2, seed=23)
    error = run_error(session, "gradcam", images=images, class_index=np.array([5, 5], np.int32))
    assert error.code == INVALID_ARGUMENT
    assert "class_index 5 is out of range" in error.message
    assert error.message.count("class_index 5 is out of range") == 1  # each distinct fault named once
    error = run_error(session, "predict_bytes", image_bytes=np.array([b"GIF89a" + bytes(40), b"\x00"], dtype=object))
    assert "GIF images are not accepted" in error.message and "unknown file signature" in error.message
