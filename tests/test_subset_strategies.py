"""Per-epoch draw rules of every subset strategy (rela_convert.dataset.subset), on synthetic selections.

Every strategy: deterministic in (seed, epoch), different across epochs and seeds,
floor(r*N) distinct dataset keys (dedup: at most its pool), laid out by EpochPlan
with equal steps on every rank.
"""

from __future__ import annotations

import numpy as np
import pytest

import cli
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.selection_file import Selection, SelectionError
from rela_convert.dataset.subset import (
    SUBSET_STRATEGIES,
    SubsetStrategy,
    balanced_counts,
    draw_random,
    load_strategy,
    selection_strategies,
    subset_size,
)
from rela_train.data.plan import EpochPlan

#: The built-in strategies, in registration order.
STRATEGIES = ("random", "dedup", "balanced", "prototypical", "hard")

CLUSTER_SIZES = [1500, 800, 400, 200, 60, 30, 9, 1]


def synthetic_selection(removed_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, Selection]:
    """3,000 samples with key gaps, 8 clusters of very different sizes, random scores, 10% duplicates."""
    rng = np.random.default_rng(seed)
    keys = np.arange(0, 3 * sum(CLUSTER_SIZES), 3, dtype=np.int64)
    cluster = rng.permutation(np.repeat(np.arange(len(CLUSTER_SIZES)), CLUSTER_SIZES)).astype(np.int32)
    similarity = rng.uniform(0.2, 1.0, len(keys)).astype(np.float32)
    keep = rng.uniform(size=len(keys)) >= removed_fraction
    duplicate_of = np.where(keep, -1, keys[0])
    centroids = np.eye(len(CLUSTER_SIZES), 4, dtype=np.float32)
    return keys, Selection(keys, cluster, similarity, keep, duplicate_of, centroids)


def strategy(name: str, selection: Selection) -> SubsetStrategy:
    return SubsetStrategy(name, None if name == "random" else selection)


def test_cli_offers_every_strategy():
    assert tuple(SUBSET_STRATEGIES.names())[: len(STRATEGIES)] == STRATEGIES  # built-ins first
    assert selection_strategies()[:4] == ["dedup", "balanced", "prototypical", "hard"]
    for command, option in (("convert", "subset"), ("train", "subset"), ("select", "strategy"), ("study", "subsets")):
        parameter = next(parameter for parameter in cli.main.commands[command].params if parameter.name == option)
        assert parameter.type.registry is SUBSET_STRATEGIES, command  # the CLI's choices are the registry's


@pytest.mark.parametrize("name", STRATEGIES)
def test_draws_are_deterministic_per_seed_and_epoch_and_differ_across_epochs(name):
    keys, selection = synthetic_selection()
    rule = strategy(name, selection)
    first = rule.draw(keys, 0.2, seed=0, epoch=0)
    assert len(first) == subset_size(len(keys), 0.2) == 600
    assert len(np.unique(first)) == len(first) and np.isin(first, keys).all() and np.all(np.diff(first) > 0)
    assert np.array_equal(first, rule.draw(keys, 0.2, seed=0, epoch=0))
    assert np.array_equal(
        first, strategy(name, synthetic_selection()[1]).draw(keys, 0.2, seed=0, epoch=0)
    )  # a reloaded selection
    for other in (rule.draw(keys, 0.2, seed=0, epoch=1), rule.draw(keys, 0.2, seed=1, epoch=0)):
        assert not np.array_equal(first, other)
        assert len(np.intersect1d(first, other)) < 0.6 * len(first)  # fresh draws, not a fixed subset
    if name == "dedup":
        assert selection.keep[np.searchsorted(keys, first)].all()  # never a removed duplicate


def test_random_is_the_papers_uniform_draw():
    keys, _ = synthetic_selection()
    assert np.array_equal(SubsetStrategy().draw(keys, 0.3, 5, 7), draw_random(keys, 0.3, 5, 7))


def test_dedup_without_duplicates_equals_random_and_caps_at_the_pool():
    keys, selection = synthetic_selection(removed_fraction=0.0)
    rule = SubsetStrategy("dedup", selection)
    assert np.array_equal(rule.draw(keys, 0.3, 2, 4), draw_random(keys, 0.3, 2, 4))
    keys, selection = synthetic_selection(removed_fraction=0.25)
    pool = keys[selection.keep]
    everything = SubsetStrategy("dedup", selection).draw(keys, 0.9, 0, 0)  # floor(0.9 N) > pool: the whole pool
    assert np.array_equal(everything, pool)


def test_balanced_counts_water_fill():
    rng = np.random.default_rng(0)
    assert balanced_counts(np.array([10, 3, 1]), 9, rng).tolist() == [5, 3, 1]
    assert balanced_counts(np.array([10, 3, 1]), 10, rng).tolist() == [6, 3, 1]
    assert balanced_counts(np.array([10, 3, 1]), 14, rng).tolist() == [10, 3, 1]
    counts = balanced_counts(np.array([10, 3, 1, 0]), 2, rng)
    assert counts.sum() == 2 and counts.max() == 1 and counts[3] == 0
    counts = balanced_counts(np.array(CLUSTER_SIZES), 600, rng)
    assert counts.sum() == 600 and (counts <= CLUSTER_SIZES).all()
    full = np.array(CLUSTER_SIZES) <= counts.max() - 1
    assert (counts[full] == np.array(CLUSTER_SIZES)[full]).all()  # small clusters fully used
    assert counts[~full].max() - counts[~full].min() <= 1  # the others equal up to one


def test_balanced_covers_every_cluster_and_evens_them_out():
    keys, selection = synthetic_selection()
    sizes = np.array(CLUSTER_SIZES)
    for epoch in range(5):
        drawn = SubsetStrategy("balanced", selection).draw(keys, 0.2, 0, epoch)
        per_cluster = np.bincount(selection.cluster[np.searchsorted(keys, drawn)], minlength=len(sizes))
        assert (per_cluster > 0).all()  # every cluster, even the one-image cluster
        small = sizes < per_cluster.max()
        assert (per_cluster[small] == sizes[small]).all() and per_cluster[~small].max() - per_cluster[~small].min() <= 1
    random_counts = np.bincount(
        selection.cluster[np.searchsorted(keys, draw_random(keys, 0.2, 0, 0))], minlength=len(sizes)
    )
    assert random_counts[0] > 250 and per_cluster[0] < 160  # random follows the cluster sizes, balanced does not


def test_prototypical_and_hard_favour_their_end():
    keys, selection = synthetic_selection()
    mean = lambda drawn: float(selection.similarity[np.searchsorted(keys, drawn)].mean())  # noqa: E731
    uniform = np.mean([mean(draw_random(keys, 0.2, 0, epoch)) for epoch in range(5)])
    prototypical = np.mean(
        [mean(SubsetStrategy("prototypical", selection).draw(keys, 0.2, 0, epoch)) for epoch in range(5)]
    )
    hard = np.mean([mean(SubsetStrategy("hard", selection).draw(keys, 0.2, 0, epoch)) for epoch in range(5)])
    assert hard + 0.1 < uniform < prototypical - 0.1
    flat = SubsetStrategy("hard", selection, sharpness=0.0)  # sharpness 0: uniform
    assert abs(np.mean([mean(flat.draw(keys, 0.2, 0, epoch)) for epoch in range(5)]) - uniform) < 0.02
    for name in ("balanced", "prototypical", "hard"):  # r = 1: everything
        assert np.array_equal(SubsetStrategy(name, selection).draw(keys, 1.0, 0, 0), keys)


@pytest.mark.parametrize("name", STRATEGIES)
def test_epoch_plan_with_every_strategy(name):
    keys, selection = synthetic_selection(removed_fraction=0.5)
    shard_sizes = [1000, 1000, 1000]
    world, batch = 2, 16
    rule = strategy(name, selection)
    plan = EpochPlan.make(keys, shard_sizes, 0.6, seed=3, epoch=1, world=world, batch_size=batch, subset=rule)
    drawn = rule.draw(keys, 0.6, 3, 1)
    assert plan.steps == len(drawn) // (world * batch)
    if name == "dedup":
        assert len(drawn) == selection.keep.sum() < subset_size(len(keys), 0.6)  # capped at the pool
    everything = np.concatenate(
        [plan.share(rank, world, worker, 2, batch)[0] for rank in range(world) for worker in range(2)]
    )
    assert len(everything) == len(np.unique(everything)) == plan.steps * world * batch
    assert np.isin(everything, drawn).all()


def test_strategies_that_need_a_selection_say_how_to_get_one(tmp_path):
    keys, selection = synthetic_selection()
    with pytest.raises(SelectionError, match="rela select"):
        SubsetStrategy("balanced").draw(keys, 0.2, 0, 0)
    index = DatasetIndex(  # an index without a selection; only subset and keys_file matter here
        num_samples=len(keys),
        num_skipped=0,
        classes=[],
        storage="hdf5",
        formats={"hdf5": []},
        order={"seed": 0, "rule": ""},
        feature_dim=4,
        feature_dtype="float32",
        prior={},
        keys_file="keys.npy",
        keys_sha256="",
        image_sizes={},
        skipped_file="skipped.jsonl",
        subset={"strategy": "random", "data_ratio": 0.5, "seed": 0},
        job={},
    )
    assert load_strategy(tmp_path, index).name == "random"
    with pytest.raises(SelectionError, match="rela select"):
        load_strategy(tmp_path, index, "hard", keys)
    with pytest.raises(ValueError, match="unknown subset strategy"):
        load_strategy(tmp_path, index, "smart", keys)
    with pytest.raises(SelectionError, match="other samples"):
        SubsetStrategy("hard", selection).draw(keys[:-1], 0.2, 0, 0)
