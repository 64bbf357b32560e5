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


def _venv(tmp_path: pathlib.Path, wheel: pathlib.Path) -> pathlib.Path:
    """A fresh virtual environment with `wheel` installed (offline, without dependencies) and this
    environment's packages lent through a .pth file; its python."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", str(wheel)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    pathlib.Path(_purelib(python), "lent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def _purelib(python: pathlib.Path) -> str:
    return subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()


def _readme_snippet(first_line: str) -> str:
    """README's Python block that starts with `first_line`, as a user copies it."""
    blocks = (ROOT / "README.md").read_text().split("```python\n")[1:]
    (block,) = [b.split("```")[0] for b in blocks if b.startswith(first_line)]
    return block


def test_client_installs_alone_and_the_readme_snippet_runs_from_another_directory(tiny_gradcam_model, tmp_path):
    """`pip install ./client` in a fresh virtual environment; then the README's snippet, from an empty
    directory, explains an image served by an embedded server. Offline: the wheel is built with this
    environment's setuptools, and the client's dependencies (grpcio, protobuf, numpy, OpenCV) are lent
    from this environment through a .pth file. Installed, the client is camserve.client: no top-level
    `client` lands in site-packages, and nothing imports TensorFlow."""
    wheel = _wheel(ROOT / "client", tmp_path)
    assert wheel.name.startswith("camserve_client-")
    python = _venv(tmp_path, wheel)
    assert sorted(p.name for p in pathlib.Path(_purelib(python)).iterdir() if not p.name.startswith("_")
                  and not p.name.endswith((".dist-info", ".pth")) and p.name not in ("pip", "setuptools",
                                                                                      "pkg_resources")) == ["camserve"]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "cat.png").write_bytes(png(random_images(1, TINY_SIZE, 7)[0]))
    with servers.running({"rel": tiny_gradcam_model}, metrics=False) as server:
        snippet = _readme_snippet("from camserve.client import CamClient")
        for readme, here in (("localhost:8500", f"127.0.0.1:{server.port}"), ("efficientnet_lite0_cam", "rel"),
                             ("samples/chelsea.png", "cat.png")):
            assert readme in snippet
            snippet = snippet.replace(readme, here)
        snippet += f"""
import sys
import camserve.client
assert not camserve.client.__file__.startswith({str(ROOT)!r}), camserve.client.__file__
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
                     "export/options.py", "serving/registry.py", "serving/servables/session.py", "bench/__main__.py"):
        assert f"camserve/{expected}" in names, expected
    assert {name.split("/")[0] for name in names} == {"camserve", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    assert "camserve/__init__.py" not in names  # a namespace package, shared with the thin client's wheel
    # Installed, the exporter runs under its own name, its relative imports resolved inside camserve.
    python = _venv(tmp_path, wheel)
    run = subprocess.run([python, "-m", "camserve.export", "--help"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "--backbone" in run.stdout, run.stderr[-3000:]
