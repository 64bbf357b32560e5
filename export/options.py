"""Every export option, its default and its help, written once.

`python -m export` derives its flags from `ExportOptions` (`--max-batch-size` for `max_batch_size`),
`export_savedmodel` takes one, and the explainer reads its numbers from it. A method that scores
channels one by one brings its own option, `<method>_channels`, from its registry entry (export/methods.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Sequence

from .decode import DEFAULT_MAX_PIXELS
from .methods import METHODS
from .smoothing import SMOOTHINGS

# --precision -> the Keras dtype policy of every layer: compute in that type, variables in float32.
PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def option(default: Any = dataclasses.MISSING, help: str = "", **cli: Any) -> Any:
    """A field with its command-line help (and argparse settings such as `type` or `choices`)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def channels_field(method: str) -> str:
    """The option of a method's channel limit: scorecam -> scorecam_channels (flag --scorecam-channels)."""
    return f"{method}_channels"


@dataclasses.dataclass(frozen=True, kw_only=True)
class _FixedOptions:
    """What `python -m export` and `export_savedmodel` build; only `backbone` and `model_name` are required."""

    backbone: str = option(help="keras.applications name (resnet50, vgg16, ...) or a .keras file")
    weights: str = option(
        "imagenet", "imagenet, auto (imagenet, else random when offline), none (random) or a weights file"
    )
    methods: tuple[str, ...] = option(
        ("gradcam",), f"comma list from {', '.join(METHODS)}, or all; the first is serving_default"
    )
    model_name: str = option(help="the model's name: its folder under --base-path")
    base_path: str = option("models", "the folder of the models' folders")
    version: int | None = option(None, "version number (default: the next one)", type=int)
    target_layer: str | None = option(
        None, "layer to explain (default: found automatically, the last 4-D layer or transformer block: README)")
    token_grid: str | None = option(None, "HxW: the patch grid of a token target layer [N, T, C] (default: found)")
    prefix_tokens: int | None = option(
        None, "tokens before the patch grid in a token target layer: class, distillation, registers (default: found)",
        type=int)
    target_layers: tuple[str, ...] = option(
        (), "comma list of layers whose maps are fused (LayerCAM's fusion) in <method>_fused signatures"
    )
    image_size: int | None = option(None, "input size (default: the model's own)", type=int)
    preprocess: str = option("auto", "auto, none, or a keras.applications name")
    labels: str | None = option(None, "class names file, one per line")
    top_k: int = option(5, "classes in top_k_*")
    top_k_maps: int = option(0, "also return heatmaps of the K top classes")
    smooth: tuple[str, ...] = option(
        (), "comma list of " + "; ".join(f"{name} ({what})" for name, what in SMOOTHINGS.items())
        + ": adds a <method>_smooth signature for each method")
    feature_maps: int = option(36, "most activated channels in feature_maps (0: no such signature)")
    precision: str = option(
        "float32",
        "type the backbone and head compute in (variables, explanation and outputs stay float32)",
        choices=tuple(PRECISIONS),
    )
    jit_compile: bool = option(False, "compile the signatures with XLA")
    warmup_batch_sizes: tuple[int, ...] = option((1, 8), "comma list of batch sizes for the warm-up records", type=int)
    max_batch_size: int = option(128, "larger requests are refused")
    max_image_pixels: int = option(DEFAULT_MAX_PIXELS, "larger images are refused before decoding")

    def __post_init__(self) -> None:
        # Lists become tuples (the options stay immutable and hashable); "all" names every method.
        for field in ("methods", "target_layers", "warmup_batch_sizes", "smooth"):
            value = getattr(self, field)
            object.__setattr__(self, field, (value,) if isinstance(value, str) else tuple(value))
        if self.methods == ("all",):
            object.__setattr__(self, "methods", tuple(METHODS))
        if not self.methods:
            raise ValueError("give at least one method")
        for name in self.smooth:
            if name not in SMOOTHINGS:
                raise ValueError(f"--smooth {name!r}: choose from {', '.join(SMOOTHINGS)}")

    @property
    def channels(self) -> dict[str, int]:
        """How many channels each method with a channel limit scores: its `<method>_channels` option."""
        return {m.name: getattr(self, channels_field(m.name)) for m in METHODS.values() if m.channel_limit}


# The fixed options plus one per method with a channel limit, its default and help from the registry.
ExportOptions = dataclasses.make_dataclass(
    "ExportOptions",
    [(channels_field(m.name), int, option(m.channel_limit.default, f"{m.name} {m.channel_limit.help}"))
     for m in METHODS.values() if m.channel_limit],
    bases=(_FixedOptions,), frozen=True, kw_only=True,
    namespace={"__module__": __name__, "__doc__": _FixedOptions.__doc__},
)


def comma_list(element: type):
    """argparse type of a comma-separated list; empty items are dropped."""
    return lambda text: tuple(element(item.strip()) for item in text.split(",") if item.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of ExportOptions, with the field's default, help and type."""
    for field in dataclasses.fields(ExportOptions):
        settings = dict(field.metadata)
        required = field.default is dataclasses.MISSING
        if isinstance(field.default, bool):
            settings["action"] = "store_true"
        elif isinstance(field.default, tuple):
            settings["type"] = comma_list(settings.get("type", str))
        elif isinstance(field.default, int):
            settings["type"] = int
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, required=required,
                            default=None if required else field.default, **settings)


def from_args(args: argparse.Namespace) -> ExportOptions:
    return ExportOptions(**{field.name: getattr(args, field.name) for field in dataclasses.fields(ExportOptions)})


def parse_args(argv: Sequence[str] | None = None, **parser_settings: Any) -> ExportOptions:
    parser = argparse.ArgumentParser(**parser_settings)
    add_arguments(parser)
    return from_args(parser.parse_args(argv))
