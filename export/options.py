"""Every export option, its default and its help, written once.

`python -m export` derives its flags from `ExportOptions` (`--max-batch-size` for `max_batch_size`) and
`export_savedmodel` takes one, handing each step of the export the values it needs. A method that scores
channels one by one brings its own flag, `--<method>-channels`, from its registry entry
(export/methods.py); the flags fill `channels`.
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


def channels_flag(method: str) -> str:
    """The flag of a method's channel limit: scorecam -> --scorecam-channels."""
    return f"--{method}-channels"


def default_channels() -> tuple[tuple[str, int], ...]:
    """(method, channel limit) of each method with one, at the registry's defaults."""
    return tuple((m.name, m.channel_limit.default) for m in METHODS.values() if m.channel_limit)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportOptions:
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
        None, "layer to explain (default: found automatically, the last 4-D layer or transformer block: DEPLOYING)")
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
    # (method, how many channels it scores) for the methods with a channel limit: flags --<method>-channels
    channels: tuple[tuple[str, int], ...] = dataclasses.field(default_factory=default_channels)

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
        # Given as a mapping or pairs, for some methods: the others keep the registry's default.
        given = dict(self.channels)
        unknown = set(given) - {name for name, _ in default_channels()}
        if unknown:
            raise ValueError(f"channel limits for methods without one: {', '.join(sorted(unknown))}")
        object.__setattr__(self, "channels", tuple((name, int(given.get(name, limit)))
                                                   for name, limit in default_channels()))


def comma_list(element: type):
    """argparse type of a comma-separated list; empty items are dropped."""
    return lambda text: tuple(element(item.strip()) for item in text.split(",") if item.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field of ExportOptions, with the field's default, help and type; one per channel limit."""
    for field in dataclasses.fields(ExportOptions):
        if field.name == "channels":
            for name, limit in default_channels():
                parser.add_argument(channels_flag(name), dest=f"{name}_channels", type=int, default=limit,
                                    help=f"{name} {METHODS[name].channel_limit.help}")
            continue
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
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(ExportOptions)
              if field.name != "channels"}
    return ExportOptions(**values, channels={name: getattr(args, f"{name}_channels") for name, _ in default_channels()})


def parse_args(argv: Sequence[str] | None = None, **parser_settings: Any) -> ExportOptions:
    parser = argparse.ArgumentParser(**parser_settings)
    add_arguments(parser)
    return from_args(parser.parse_args(argv))
