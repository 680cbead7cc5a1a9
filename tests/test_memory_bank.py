"""The memory bank (PatchCore's coreset and nearest-neighbour distances) against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ddad.memory_bank import coreset_size, greedy_coreset, nearest_distances, random_projection


@pytest.mark.parametrize("block", [2048, 16, 1])  # one block; lazy blocks (20, and one point each)
def test_each_coreset_pick_is_the_point_farthest_from_those_already_chosen(block):
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(300, 8, generator=g), torch.randn(20, 8, generator=g) * 4 + 6])  # two clumps
    feats = feats[torch.randperm(320, generator=g)]
    picked = greedy_coreset(feats, 60, seed=3, block=block).tolist()
    assert len(set(picked)) == 60
    x = feats.double().numpy()
    dists = np.linalg.norm(x[:, None] - x[None], axis=-1)  # every pair, by brute force
    for i in range(1, 60):
        nearest_centre = dists[:, picked[:i]].min(axis=1)
        assert nearest_centre[picked[i]] == pytest.approx(nearest_centre.max(), rel=1e-5), i
    assert greedy_coreset(feats, 60, seed=3, block=block).tolist() == picked  # the seed decides the first pick
    assert greedy_coreset(feats, 60, seed=4, block=block).tolist() != picked
    assert (coreset_size(320, 0.1), coreset_size(5, 0.01), coreset_size(5, 1.0)) == (32, 1, 5)
    with pytest.raises(ValueError, match="fraction"):
        coreset_size(10, 0.0)


def test_a_projection_keeps_distances_and_the_coreset_covers_the_rare_clump():
    g = torch.Generator().manual_seed(1)
    feats = torch.cat([torch.randn(400, 512, generator=g), torch.randn(5, 512, generator=g) + 20])
    z = random_projection(feats, 128, seed=0)
    assert z.shape == (405, 128)
    a, b = feats[:50].double(), z[:50].double()
    ratio = torch.pdist(b) / torch.pdist(a)
    assert 0.8 < ratio.min() and ratio.max() < 1.2  # Johnson-Lindenstrauss at 128 dimensions
    picked = greedy_coreset(feats, 10, seed=0)
    assert (picked >= 400).any()  # the far clump is among the first picks


def test_bank_distances_equal_brute_force_nearest_neighbours_in_any_chunking():
    g = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(257, 16, generator=g) * 10, torch.randn(101, 16, generator=g) * 10
    queries[:5] = bank[[0, 7, 100, 200, 256]]  # exact matches: distance 0, no cancellation error
    reference = np.linalg.norm(queries.double().numpy()[:, None] - bank.double().numpy()[None], axis=-1).min(axis=1)
    for chunk, block in ((1, 4096), (7, 4096), (4096, 4096), (7, 1), (13, 50), (4096, 256)):  # bank in blocks too
        got = nearest_distances(queries, bank, chunk=chunk, block=block).double().numpy()
        assert np.allclose(got, reference, rtol=1e-5, atol=1e-5), (chunk, block)
    assert np.all(nearest_distances(queries[:5], bank).numpy() == 0)
    with pytest.raises(ValueError, match="share D"):
        nearest_distances(queries[:, :3], bank)
