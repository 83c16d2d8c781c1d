"""SharedComputation: what counts as 'the same input', and prefix reuse in the elastic encoder."""
from __future__ import annotations

import torch

from espnet_compress.core.sharing import SharedComputation
from espnet_compress.encoders.aliases import FoldableConformerEncoder
from tests.conftest import tiny_conformer_options


def _counting():
    calls = []

    def fn(*args):
        calls.append(args)
        return object()

    return fn, calls


def test_same_tensor_and_same_view_are_reused_equal_copies_are_not():
    memo, (fn, calls) = SharedComputation(), _counting()
    base = torch.randn(2, 8, 3)
    first = memo("k", fn, base[:, :6])
    assert memo("k", fn, base[:, :6]) is first  # a new view of the same data: reused
    memo("k", fn, base[:, :6].clone())  # equal values, other tensor: recomputed
    memo("k", fn, base[:, :5])  # other view: recomputed
    memo("other", fn, base[:, :6])  # other key (module/width/precision): recomputed
    assert len(calls) == 4 and (memo.hits, memo.misses) == (1, 4)


def test_an_in_place_change_invalidates_the_entry():
    memo, (fn, calls) = SharedComputation(), _counting()
    x = torch.randn(4, 3)
    memo("k", fn, x)
    x.mul_(2.0)
    memo("k", fn, x)
    assert len(calls) == 2


def test_masks_and_lengths_match_by_value_grad_tensors_only_by_identity():
    memo, (fn, calls) = SharedComputation(), _counting()
    x = torch.randn(2, 5, requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    a = memo("k", fn, x, mask, 3)
    assert memo("k", fn, x, mask.clone(), 3) is a
    memo("k", fn, x, mask, 4)
    memo("k", fn, x.detach(), mask, 3)
    memo("k", fn, x * 1.0, mask, 3)
    assert len(calls) == 4


def _foldable(order: str) -> FoldableConformerEncoder:
    torch.manual_seed(0)
    enc = FoldableConformerEncoder(20, fold={"order": order}, **tiny_conformer_options(num_blocks=2))
    return enc.eval()


def test_cycle_order_seed_is_a_prefix_of_its_unfolding():
    """In ``cycle`` order the seed (0 1) is the first half of depth 4 (0 1 0 1): joint training
    computes it once. In ``in_place`` order (0 0 1 1) only the first use of block 0 is shared."""
    x, lens = torch.randn(2, 40, 20), torch.tensor([40, 33])
    for order, expected_hits in (("cycle", 3), ("in_place", 2)):
        enc = _foldable(order)
        memo = SharedComputation()
        with enc.sharing(memo):
            with enc.using({"depth": 4}):
                deep, _, _ = enc(x, lens)
            with enc.using({"depth": 2}):
                seed, _, _ = enc(x, lens)
        assert memo.hits == expected_hits, order  # embed + shared blocks
        with enc.using({"depth": 2}):
            alone, _, _ = enc(x, lens)
        torch.testing.assert_close(seed, alone)
        assert "forward" not in vars(enc.embed)  # the context left no trace
        assert enc.encoders.memo is None
