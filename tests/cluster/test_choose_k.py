"""clusterlab.cluster.choose_k: K, label-free, from the features."""

from __future__ import annotations

import torch


def test_k_is_the_number_of_separated_groups_in_the_features():
    from clusterlab.cluster.choose_k import choose

    generator = torch.Generator().manual_seed(0)
    for groups in (3, 7, 12):
        centres = torch.nn.functional.normalize(torch.randn(groups, 32, generator=generator), dim=1)
        points = centres.repeat_interleave(60, 0) + 0.15 * torch.randn(groups * 60, 32, generator=generator)
        choice = choose(torch.nn.functional.normalize(points, dim=1), range(2, 21))
        assert choice.k == groups and choice.curve["chosen"] == groups and len(choice.curve["value"]) == 19


def test_k_counts_kinds_not_their_sub_kinds():
    """Each kind made of two nearby sub-kinds (sleeve lengths, shoe types): K is the number of
    kinds. (The eigengap, used before, gave 7 for the 10 kinds here.)"""
    from clusterlab.cluster.choose_k import choose

    generator = torch.Generator().manual_seed(0)
    for kinds in (4, 8, 10):
        centres = torch.nn.functional.normalize(torch.randn(kinds, 32, generator=generator), dim=1)
        offsets = torch.nn.functional.normalize(torch.randn(kinds * 2, 32, generator=generator), dim=1)
        sub_kinds = centres.repeat_interleave(2, 0) + 0.25 * offsets
        points = sub_kinds.repeat_interleave(60, 0) + 0.1 * torch.randn(kinds * 120, 32, generator=generator)
        assert choose(torch.nn.functional.normalize(points, dim=1), range(2, 21)).k == kinds
