"""The one mask builder of history-conditioned students (ARD's Fig. 3b; DD-H)."""
import pytest
import torch

from distilled_decoding.history_mask import block_mask, canonical, history_mask, visible_blocks

# ARD Fig. 3b for S = 4 (rows: queries = inputs x_{τ4} (noise) .. x_{τ1}; columns: keys)
FIG3B = {
    "M1": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
    "M2": [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]],
    "M3": [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]],
    "M4": [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
}


@pytest.mark.parametrize("kind", sorted(FIG3B))
def test_block_masks_are_fig3b(kind):
    assert block_mask(4, kind).int().tolist() == FIG3B[kind]


def test_aliases_and_bad_kind():
    assert [canonical(k) for k in ("none", "noise", "all", "window")] == ["M1", "M3", "M4", "M2"]
    with pytest.raises(ValueError, match="M5"):
        canonical("M5")


def test_token_mask_expands_blocks_and_keeps_within_pattern():
    L = 3
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    m = history_mask(3, L, "M3", within=causal)
    assert m.shape == (9, 9)
    # block 2 sees all of block 0, none of block 1, and itself causally
    assert m[6:9, 0:3].all() and not m[6:9, 3:6].any()
    assert torch.equal(m[6:9, 6:9], causal)
    assert torch.equal(history_mask(3, L, "M4")[3:6, 0:6], torch.ones(3, 6, dtype=torch.bool))
    assert visible_blocks(4, "M2", 3) == [2, 3]
