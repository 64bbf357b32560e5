"""Quality metrics over gRPC, and the feature-map view, on the synthetic-shapes model."""

from __future__ import annotations

import subprocess
import sys

import cv2
import pytest

import synthetic
from servers import ROOT, ServerProcess


@pytest.fixture(scope="module")
def shapes_server(shapes_export):
    server = ServerProcess(["--port", "0", "--model_name", "shapes", "--model_base_path", str(shapes_export.parent)])
    address = server.wait_ready()
    yield address
    server.proc.terminate()
    server.proc.wait(30)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapes_images")
    images, _, _ = synthetic.dataset(12, seed=31)
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i:02d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder


def test_real_heatmaps_beat_a_random_map(shapes_server, image_dir):
    from camserve.client import CamClient
    from camserve.client.evaluate import evaluate, table

    with CamClient(shapes_server, model="shapes") as client:
        results = evaluate(
            client, sorted(str(p) for p in image_dir.iterdir()), ["gradcam", "cam", "eigencam"], steps=10
        )
    print("\n" + table(results))
    random = results["random"]
    for method in ("gradcam", "cam"):
        assert results[method].deletion_auc < random.deletion_auc - 0.1, (method, results)
        assert results[method].drop_at_20 > random.drop_at_20 + 0.2, (method, results)
        assert results[method].insertion_auc > random.insertion_auc, (method, results)


def test_evaluate_and_feature_grid_command_lines(shapes_server, image_dir, tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "client", "evaluate", str(image_dir), "--server", shapes_server, "--model", "shapes",
         "--methods", "all", "--per-image", "--steps", "5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "gradcam" in run.stdout and "random" in run.stdout and "deletion AUC" in run.stdout
    tables = run.stdout.split("\n\n")  # the mean over the images, then one table per image
    assert len(tables) == 1 + len(list(image_dir.iterdir())) and f"{image_dir / '00.png'}:" in tables[1]
    from camserve.export.methods import METHODS  # the shapes export has them all

    assert all(f"\n{method} " in tables[0] for method in METHODS)  # --methods all
    image = image_dir / "00.png"
    run = subprocess.run(
        [sys.executable, "-m", "client", "explain", str(image), "--server", shapes_server, "--model", "shapes",
         "--feature-grid", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    grid = cv2.imread(str(tmp_path / "00_feature_grid.png"))
    assert grid.shape == (6 * 160, 6 * 160, 3)  # 36 maps in a 6x6 grid
    assert grid.std() > 10  # not a blank picture
