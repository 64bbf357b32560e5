"""A transformer's token layer [N, T, C] laid out as the grid of image patches its tokens stand for.

Vision transformers (ViT, DeiT) and hybrids keep their features as a sequence of tokens: K prefix
tokens (a class token, DeiT's distillation token, registers), then one token per image patch, row by
row. As pytorch-grad-cam's reshape transform does, the explainer drops the prefix tokens and lays
the patch tokens out as their h x w grid, in the graph, so that every method sees A [N, h, w, C] as
it does for a CNN.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

# The most prefix tokens the exporter assumes when it guesses the layout (a class token, a
# distillation token and a few registers); more need --prefix-tokens or --token-grid.
MAX_GUESSED_PREFIX = 16


@dataclasses.dataclass(frozen=True)
class TokenGrid:
    """K prefix tokens, then an h x w grid of patch tokens."""

    prefix: int
    height: int
    width: int

    def grid(self, tokens: tf.Tensor) -> tf.Tensor:
        """The patch tokens of [N, T, C] as [N, h, w, C]."""
        return tf.reshape(tokens[:, self.prefix :], [-1, self.height, self.width, tokens.shape[-1]])

    def __str__(self) -> str:
        prefix = f"{self.prefix} prefix token{'s' * (self.prefix != 1)} + " if self.prefix else ""
        return f"{prefix}a {self.height}x{self.width} grid of patch tokens"


def parse_grid(text: str) -> tuple[int, int]:
    """--token-grid HxW -> (H, W)."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--token-grid {text!r}: write it as HxW, e.g. 14x14") from None
    if height < 1 or width < 1:
        raise ValueError(f"--token-grid {text!r}: both sides must be at least 1")
    return height, width


def _grid_of(patches: int, image_size: tuple[int, int]) -> tuple[int, int] | None:
    """The h x w grid of `patches` tokens with the image's aspect ratio whose cells tile the image."""
    image_height, image_width = image_size
    height = round((patches * image_height / image_width) ** 0.5)
    if height < 2 or patches % height:
        return None
    width = patches // height
    if height * image_width != width * image_height or image_height % height or image_width % width:
        return None
    return height, width


def token_grid(tokens: int, image_size: tuple[int, int], grid: str | None = None,
               prefix: int | None = None) -> TokenGrid:
    """The layout of a layer of `tokens` tokens: from --token-grid and --prefix-tokens, else the one
    grid of the image's aspect ratio whose cells tile the image after at most MAX_GUESSED_PREFIX
    prefix tokens (a 224x224 ViT-B/16: 197 = 1 + 14x14). Raises ValueError, naming the flags, when
    none or several fit."""
    if grid is not None:
        height, width = parse_grid(grid)
        rest = tokens - height * width
        if rest < 0 or (prefix is not None and prefix != rest):
            given = f" and --prefix-tokens {prefix}" if prefix is not None else ""
            raise ValueError(f"--token-grid {grid}{given} does not fit the target layer's {tokens} tokens")
        if prefix is None and rest > MAX_GUESSED_PREFIX:
            raise ValueError(f"--token-grid {grid} leaves {rest} of the target layer's {tokens} tokens before the "
                             f"grid: give --prefix-tokens {rest} if that is so")
        return TokenGrid(rest, height, width)
    if prefix is not None:
        if not 0 <= prefix < tokens:
            raise ValueError(f"--prefix-tokens {prefix}: the target layer has {tokens} tokens")
        found = _grid_of(tokens - prefix, image_size)
        if found is None:
            raise ValueError(f"{tokens - prefix} patch tokens do not make a grid of the {image_size[0]}x"
                             f"{image_size[1]} input's shape: give --token-grid HxW")
        return TokenGrid(prefix, *found)
    fits = [TokenGrid(k, *found) for k in range(min(MAX_GUESSED_PREFIX, tokens - 1) + 1)
            if (found := _grid_of(tokens - k, image_size))]
    if len(fits) == 1:
        return fits[0]
    what = "; ".join(str(fit) for fit in fits) if fits else "no grid of the input's shape fits"
    raise ValueError(f"cannot tell how the target layer's {tokens} tokens lie on the "
                     f"{image_size[0]}x{image_size[1]} input ({what}): give --token-grid HxW and --prefix-tokens K")
