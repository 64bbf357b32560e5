"""How a token layer's tokens are laid out on the image (export/tokens.py), without a model."""

from __future__ import annotations

import numpy as np
import pytest

from camserve.export.tokens import TokenGrid, token_grid


@pytest.mark.parametrize("tokens, size, expected", [
    (197, (224, 224), TokenGrid(1, 14, 14)),  # ViT-B/16, DeiT: a class token
    (198, (224, 224), TokenGrid(2, 14, 14)),  # DeiT distilled: class and distillation tokens
    (201, (224, 224), TokenGrid(5, 14, 14)),  # a class token and four registers
    (196, (224, 224), TokenGrid(0, 14, 14)),  # no prefix (a head that pools the tokens)
    (50, (224, 224), TokenGrid(1, 7, 7)),  # ViT-B/32
    (577, (384, 384), TokenGrid(1, 24, 24)),  # ViT-B/16 at 384
    (65, (64, 64), TokenGrid(1, 8, 8)),
    (129, (128, 256), TokenGrid(1, 8, 16)),  # a wide input: the grid keeps its aspect ratio
])
def test_the_layout_is_found_from_the_token_count_and_the_input(tokens, size, expected):
    assert token_grid(tokens, size) == expected


def test_the_flags_decide_where_the_count_cannot():
    with pytest.raises(ValueError, match="--token-grid HxW and --prefix-tokens K"):
        token_grid(20, (32, 32))  # 4 + 4x4 or 16 + 2x2
    with pytest.raises(ValueError, match="no grid of the input's shape fits"):
        token_grid(197, (225, 225))  # 14 does not divide 225: patches do not tile the image
    assert token_grid(197, (225, 225), grid="14x14") == TokenGrid(1, 14, 14)
    assert token_grid(198, (224, 224), prefix=2) == TokenGrid(2, 14, 14)
    assert token_grid(200, (224, 224), grid="14X14", prefix=4) == TokenGrid(4, 14, 14)
    with pytest.raises(ValueError, match="does not fit"):
        token_grid(197, (224, 224), grid="14x14", prefix=2)
    with pytest.raises(ValueError, match="does not fit"):
        token_grid(100, (224, 224), grid="14x14")
    with pytest.raises(ValueError, match="write it as HxW"):
        token_grid(197, (224, 224), grid="14")
    with pytest.raises(ValueError, match="do not make a grid"):
        token_grid(197, (224, 224), prefix=3)


def test_the_grid_drops_the_prefix_and_lays_the_patches_out_row_by_row():
    tokens = np.arange(2 * 7 * 3, dtype=np.float32).reshape(2, 7, 3)  # 1 prefix token + 2x3 patches
    grid = TokenGrid(1, 2, 3).grid(tokens).numpy()
    assert grid.shape == (2, 2, 3, 3)
    np.testing.assert_array_equal(grid[1, 1, 0], tokens[1, 1 + 3])  # row 1, column 0: the 4th patch
    assert str(TokenGrid(1, 2, 3)) == "1 prefix token + a 2x3 grid of patch tokens"
