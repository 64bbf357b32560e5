"""`export_savedmodel`: a Keras classifier to a version TensorFlow Serving can poll safely, in four steps.

    build    the classifier split at its target layer, the explainer, its signatures and warm-up requests
    save     the SavedModel and its warm-up file into a hidden staging folder beside the versions
    check    TF Serving's loader runs the warm-up as the TF2 functions do (verify.py), and every
             explain-path op has a GPU kernel (gpu_kernels.py)
    publish  the staging folder renamed to `<base>/<name>/<version>` (TF Serving ignores folders whose
             name is not a number, so a polling server never loads a half-written version)
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import shutil
import tempfile
import time
from typing import TYPE_CHECKING, Callable, Iterator

from .options import ExportOptions

if TYPE_CHECKING:
    from tensorflow_serving.apis import predict_pb2

IMAGENET_LABELS = pathlib.Path(__file__).parent / "data" / "imagenet_classes.txt"


def load_labels(path: str | None, num_classes: int) -> list[str]:
    """Class names from a file, the shipped ImageNet names for 1000 classes, else class_<i>."""
    if path:
        labels = pathlib.Path(path).read_text().splitlines()
    elif num_classes == 1000:
        labels = IMAGENET_LABELS.read_text().splitlines()
    else:
        labels = [f"class_{i}" for i in range(num_classes)]
    if len(labels) != num_classes:
        raise ValueError(f"{path}: {len(labels)} class names for a model with {num_classes} classes")
    return labels


@dataclasses.dataclass(frozen=True)
class Built:
    """What `build` makes and `save` writes."""

    families: dict  # name -> ConcreteFunction: the signatures saved as functions (signatures.py)
    views: list  # the other signatures, written into the saved graph (signature_defs.py)
    warmup: list["predict_pb2.PredictRequest"]
    # The variables the families capture: a concrete function holds them weakly, and the Keras model
    # that owns them is gone once `build` returns.
    variables: list


def build(o: ExportOptions, log: Callable[[str], None]) -> Built:
    """Load and split the classifier, make the explainer of `o.methods` and its signatures."""
    from .backbone import load_backbone
    from .explainer import Explainer
    from .guided import survey
    from .methods import get_method
    from .precision import check as check_precision
    from .savedmodel import captured_variables
    from .signature_defs import plan
    from .signatures import build_signatures
    from .warmup import warmup_requests

    methods = [get_method(m) for m in o.methods]
    log(f"loading {o.backbone} (weights: {o.weights}, computing in {o.precision})")
    backbone = load_backbone(o.backbone, o.weights, target_layer=o.target_layer, image_size=o.image_size,
                             preprocess=o.preprocess, target_layers=o.target_layers, precision=o.precision,
                             token_grid_size=o.token_grid, prefix_tokens=o.prefix_tokens)
    for note in backbone.notes:
        log(note)
    log(f"target layer {backbone.target_layer!r} {tuple(backbone.features.output.shape[1:])}"
        + (f" ({backbone.token_grid})" if backbone.token_grid else "")
        + f", input {backbone.image_size}, {backbone.num_classes} classes")
    labels = load_labels(o.labels, backbone.num_classes)
    explainer = Explainer(backbone, methods, top_k=o.top_k, top_k_maps=o.top_k_maps, feature_maps=o.feature_maps,
                          channels=dict(o.channels))
    if explainer.fused_methods:
        log(f"fused maps ({', '.join(explainer.fused_methods)}) over {', '.join(backbone.fusion_layers)}")
    if any(m.guided for m in methods):
        swaps = survey(backbone.features, backbone.head)
        log(f"guided backpropagation through {len(swaps.guided)} ReLU layers"
            + (f"; gradients pass unchanged through {', '.join(sorted(swaps.unguided))}" if swaps.unguided else ""))
    if o.precision != "float32":
        log(f"{o.precision} maps vs float32 on the same weights (probe images: the sample photos and noise):")
        for drift in check_precision(explainer, backbone.image_size, o.precision):
            log(f"  {drift}")
    log("tracing signatures")
    families = build_signatures(explainer, labels, smooth=o.smooth, max_batch_size=o.max_batch_size,
                                max_image_pixels=o.max_image_pixels, jit_compile=o.jit_compile)
    names = [m.name for m in methods]
    views = plan({name: list(f.structured_outputs) for name, f in families.items()}, names,
                 explainer.fused_methods, [m.name for m in methods if m.guided], default_method=names[0])
    warmup = warmup_requests(families, [m.name for m in methods if m.warmed], explainer.fused_methods,
                             backbone.image_size, o.warmup_batch_sizes)
    return Built(families, views, warmup, captured_variables(families))


def save(built: Built, folder: pathlib.Path) -> None:
    """The SavedModel with its views, and its warm-up file."""
    from camserve.serving.servables.warmup import write_warmup_requests

    from .savedmodel import save as save_signatures
    from .signature_defs import write

    save_signatures(built.families, built.variables, folder)
    write(folder, built.views)
    write_warmup_requests(folder, built.warmup)


def check(built: Built, folder: pathlib.Path, jit: bool) -> list[str]:
    """What TF Serving's loader and the GPU kernel registry say of the saved model (raises when it fails)."""
    from camserve.serving.servables.session_config import session_config

    from .gpu_kernels import check_saved_model as check_gpu_kernels
    from .signature_defs import aliases
    from .verify import verify

    # The families' graphs hold every computation of the views, which only feed them constants.
    return [str(check_gpu_kernels(folder, jit=jit, signatures=built.families)),  # no CPU-only op between GPU ops
            str(verify(folder, built.families, aliases(built.views), config=session_config()))]


@contextlib.contextmanager
def staging(model_dir: pathlib.Path, version: int) -> Iterator[pathlib.Path]:
    """A hidden folder beside the versions, removed if the export fails before `publish`."""
    model_dir.mkdir(parents=True, exist_ok=True)
    folder = pathlib.Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    try:
        yield folder
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def publish(folder: pathlib.Path, final_dir: pathlib.Path) -> None:
    folder.rename(final_dir)


def export_savedmodel(options: ExportOptions | None = None, *, log: Callable[[str], None] = print,
                      **fields) -> pathlib.Path:
    """Export a backbone with the given CAM methods; returns `<base_path>/<model_name>/<version>`.

    Takes an ExportOptions, or its fields as keywords: `export_savedmodel(backbone="efficientnet_lite0",
    weights="none", methods=["gradcam", "cam"], model_name="efficientnet_lite0_cam")`.
    """
    from camserve.serving.servables.versions import numeric_versions

    o = ExportOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    started = time.perf_counter()

    def step(message: str) -> None:
        log(f"[{time.perf_counter() - started:6.1f}s] {message}")

    model_dir = pathlib.Path(o.base_path) / o.model_name
    version = o.version or max(numeric_versions(str(model_dir)), default=0) + 1
    final_dir = model_dir / str(version)
    if final_dir.exists():
        raise FileExistsError(f"{final_dir} exists: choose another --version")
    built = build(o, step)
    with staging(model_dir, version) as folder:
        step(f"saving {', '.join(built.families)} (functions) and {', '.join(v.name for v in built.views)} "
             "(views of them: signature_defs.py)")
        save(built, folder)
        step(f"wrote {len(built.warmup)} warm-up requests (batch sizes {list(o.warmup_batch_sizes)})")
        for line in check(built, folder, o.jit_compile):
            step(line)
        if o.jit_compile:
            step("compiled with XLA: TF Serving runs it only with --xla_cpu_compilation_enabled=true or "
                 "--xla_gpu_compilation_enabled=true (python -m serving.tfserving adds the flag itself)")
        publish(folder, final_dir)
    size = sum(f.stat().st_size for f in final_dir.rglob("*") if f.is_file())
    step(f"exported {final_dir} ({size / 2**20:.1f} MiB)")
    return final_dir
