"""The packages: the thin client installs on its own and runs from anywhere without TensorFlow, the
whole project builds with its data files, and the pins agree across requirements and pyproject."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import servers
from images import png, random_images
from synthetic import TINY_SIZE

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _wheel(source: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """`pip wheel` of a copy of `source` (the build leaves nothing in the repository), offline."""
    copy = out / "source"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".*", "models", "out", "certs", "build", "*.egg-info",
                                                              "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-index", "--no-deps",
                            "--no-build-isolation", "--wheel-dir", str(out), str(copy)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = out.glob("*.whl")
    return wheel


def _pins(path: pathlib.Path) -> set[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return {line for line in lines if line and not line.startswith("#")}


def test_pins_agree_between_requirements_and_pyproject():
    everything = _pins(ROOT / "requirements.txt")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert set(project) <= everything, set(project) - everything
    assert _pins(ROOT / "client" / "requirements.txt") <= set(project)
    assert not any(name.startswith(("tensorflow", "keras")) for name in _pins(ROOT / "client" / "requirements.txt"))


def test_client_installs_alone_and_the_readme_snippet_runs_from_another_directory(rel_model, tmp_path):
    """`pip install ./client` in a fresh virtual environment; then the README's snippet, from an empty
    directory, explains an image served by an embedded server. Offline: the wheel is built with this
    environment's setuptools, and the client's dependencies (grpcio, protobuf, numpy, OpenCV) are lent
    from this environment through a .pth file; the snippet checks that nothing imported TensorFlow."""
    wheel = _wheel(ROOT / "client", tmp_path)
    assert wheel.name.startswith("camserve_client-")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    pathlib.Path(purelib, "lent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "cat.png").write_bytes(png(random_images(1, TINY_SIZE, 7)[0]))
    with servers.running({"rel": rel_model}, metrics=False) as server:
        snippet = f"""
import sys
from client import CamClient
with CamClient("127.0.0.1:{server.port}", model="rel") as c:
    e = c.explain("cat.png", method="gradcam")
    print(e.top_k, e.class_label, e.heatmap.shape)
import client
assert not client.__file__.startswith({str(ROOT)!r}), client.__file__
assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras")], "TensorFlow was imported"
"""
        run = subprocess.run([python, "-c", snippet], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                             timeout=120, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    assert f"({TINY_SIZE}, {TINY_SIZE})" in run.stdout and "class_" in run.stdout


def test_the_project_builds_a_wheel_with_its_data_files(tmp_path):
    wheel = _wheel(ROOT, tmp_path)
    assert wheel.name.startswith("camserve-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("export/data/imagenet_classes.txt", "serving/models.config", "client/web.html",
                     "export/options.py", "serving/registry.py", "bench/__main__.py"):
        assert expected in names, expected
    assert not any(name.startswith("tests/") for name in names)
