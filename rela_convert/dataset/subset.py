"""The dynamic distilled subset: which samples an epoch trains on (method.md, stage 1, step 3).

With data ratio ``r`` every epoch trains on ``floor(r * N)`` samples drawn
uniformly without replacement, afresh each epoch (Sun, Jiang, Lin, NeurIPS 2024,
Sec. 4.1 and the reference code): the ``random`` strategy, the default.

The other strategies are this project's addition and use the selection that
``rela convert --subset`` / ``rela select`` stored (:mod:`rela_convert.selection`).
Every draw depends only on ``(seed, epoch)`` and the stored selection, is drawn
afresh each epoch, and has ``floor(r * N)`` distinct keys, ``N`` the whole
dataset, so every strategy costs the same per epoch:

- ``random``: uniform without replacement.
- ``dedup``: uniform without replacement from the pool left after near-duplicate
  removal. When ``floor(r * N)`` exceeds the pool, the epoch is the whole pool
  (fewer images, and steps, than ``random``): duplicates are never drawn back in.
  With no duplicates removed it is exactly the ``random`` draw.
- ``balanced``: the budget ``B = floor(r * N)`` is spread equally across k-means
  clusters up to each cluster's size (water-filling: every cluster gets
  ``min(n_c, t)`` with ``t`` the largest level that fits, the ``< k`` images left
  over go one each to randomly chosen clusters larger than ``t``), then each
  cluster's share is drawn uniformly. Every non-empty cluster appears when ``B >= k``.
- ``prototypical`` / ``hard``: weighted sampling without replacement (Gumbel
  top-``B``) with weight ``exp(s * u)``, ``u`` in [0, 1] the rank percentile of
  the image's cosine similarity to its centroid (``prototypical``: 1 for the most
  similar; ``hard``: 1 for the least) and ``s`` the sharpness (default 3: the
  favoured extreme is e^3 = 20 times as likely to be drawn first as the other).
  Ranks, not raw similarities, so the rule does not depend on the prior's scale.
  At ``r = 1`` every strategy but ``dedup`` trains on everything.

The strategies are found by name in the :data:`SUBSET_STRATEGIES` registry. Adding one is one
file: a draw rule ``(keys, data_ratio, seed, epoch, selection, sharpness) -> sorted distinct int64
keys`` decorated with ``@register_strategy("<name>", needs_selection=...)``, imported before use
(or declared under the ``rela.subset_strategies`` entry-point group, which every process, DataLoader
workers included, loads on first look-up; :mod:`rela_convert.registry`). A rule that needs the
selection gets one aligned with ``keys`` (checked by :meth:`SubsetStrategy.draw`); others get None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.selection_file import DEFAULT_SHARPNESS, Selection, SelectionError, load_selection
from rela_convert.registry import Registry

#: Draw rules ``(keys, data_ratio, seed, epoch, selection, sharpness) -> sorted distinct int64 keys`` by
#: name (``random``, ``dedup``, ``balanced``, ``prototypical``, ``hard``); each has ``needs_selection``.
SUBSET_STRATEGIES: Registry[Callable[..., np.ndarray]] = Registry(
    "subset strategy", "rela_convert.dataset.subset", group="rela.subset_strategies"
)


def register_strategy(name: str, *, needs_selection: bool = True) -> Callable:
    """Decorator registering a per-epoch draw rule as subset strategy ``name``.

    The rule is called as ``rule(keys, data_ratio, seed, epoch, selection, sharpness)``: ``keys`` int64
    ``[N]`` (the dataset's, in shard order), ``data_ratio`` r in (0, 1], the run ``seed`` and 0-based
    ``epoch`` (the draw must depend on nothing else), ``selection`` the stored :class:`Selection`
    aligned with ``keys`` (None unless ``needs_selection``), ``sharpness`` the dataset's recorded
    weight sharpness; it returns the epoch's keys, sorted and distinct (:func:`subset_size` of them
    to cost what the others cost). The first paragraph of its docstring describes it.

    Args:
        name: the ``--subset`` name.
        needs_selection: whether the rule reads ``selection.npz`` (``rela select`` computes it).

    Raises:
        rela_convert.registry.RegistryError: ``name`` is already registered to another rule.
    """

    def decorate(rule: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
        rule.needs_selection = needs_selection
        return SUBSET_STRATEGIES.register(name)(rule)

    return decorate


def selection_strategies() -> list[str]:
    """The registered strategies that need the stored selection (all but ``random`` among the built-ins)."""
    return [name for name in SUBSET_STRATEGIES.names() if SUBSET_STRATEGIES.get(name).needs_selection]


def subset_size(num_samples: int, data_ratio: float) -> int:
    """``floor(r * N)``, at least 1.

    Raises:
        ValueError: ``data_ratio`` outside (0, 1].
    """
    if not 0 < data_ratio <= 1:
        raise ValueError(f"data ratio must be in (0, 1], got {data_ratio}")
    return max(1, math.floor(data_ratio * num_samples + 1e-9))


@register_strategy("random", needs_selection=False)
def draw_random(
    keys: np.ndarray,
    data_ratio: float,
    seed: int,
    epoch: int,
    selection: Selection | None = None,
    sharpness: float = DEFAULT_SHARPNESS,
) -> np.ndarray:
    """The keys an epoch trains on under the paper's ``random`` rule.

    Args:
        keys: int64 ``[N]`` sample keys of the converted dataset.
        data_ratio: r in (0, 1].
        seed: run seed; the draw depends only on ``(seed, epoch)``.
        epoch: 0-based epoch.
        selection, sharpness: unused (the registry's call signature).

    Returns:
        Sorted int64 ``[floor(r*N)]`` keys, distinct.
    """
    generator = np.random.default_rng([seed, epoch])
    chosen = generator.choice(len(keys), size=subset_size(len(keys), data_ratio), replace=False)
    return np.sort(keys[chosen])


def key_mask(chosen: np.ndarray, max_key: int) -> np.ndarray:
    """Boolean ``[max_key + 1]`` membership mask of the chosen keys (cheap per-sample lookup)."""
    mask = np.zeros(max_key + 1, dtype=bool)
    mask[chosen] = True
    return mask


def _aligned(keys: np.ndarray, selection: Selection | None, strategy: str) -> Selection:
    if selection is None:
        raise SelectionError(
            f"subset strategy {strategy!r} needs a selection; compute one with: rela select DATA --subset {strategy}"
        )
    if len(selection.keys) != len(keys) or not np.array_equal(selection.keys, keys):
        raise SelectionError(
            f"the selection for {strategy!r} belongs to other samples than the dataset's keys; rerun rela select"
        )
    return selection


@register_strategy("dedup", needs_selection=True)
def draw_dedup(
    keys: np.ndarray,
    data_ratio: float,
    seed: int,
    epoch: int,
    selection: Selection,
    sharpness: float = DEFAULT_SHARPNESS,
) -> np.ndarray:
    """``min(floor(r*N), pool)`` keys drawn uniformly without replacement from the deduplicated pool, sorted."""
    pool = keys[_aligned(keys, selection, "dedup").keep]
    generator = np.random.default_rng([seed, epoch])
    chosen = generator.choice(len(pool), size=min(subset_size(len(keys), data_ratio), len(pool)), replace=False)
    return np.sort(pool[chosen])


def balanced_counts(sizes: np.ndarray, budget: int, generator: np.random.Generator) -> np.ndarray:
    """Images per cluster: equal shares up to each cluster's size (water-filling), the
    remainder one each to randomly chosen clusters that still have images.

    Args:
        sizes: int ``[k]`` cluster sizes.
        budget: images to allocate (at most ``sizes.sum()``).

    Returns:
        int64 ``[k]`` counts, ``counts <= sizes``, summing to ``budget``.
    """
    sizes = np.asarray(sizes, np.int64)
    budget = min(int(budget), int(sizes.sum()))
    low, high = 0, int(sizes.max(initial=0))
    while low < high:  # largest level t with sum(min(sizes, t)) <= budget
        middle = (low + high + 1) // 2
        if np.minimum(sizes, middle).sum() <= budget:
            low = middle
        else:
            high = middle - 1
    counts = np.minimum(sizes, low)
    remainder = budget - int(counts.sum())
    if remainder:
        counts[generator.choice(np.flatnonzero(sizes > low), size=remainder, replace=False)] += 1
    return counts


@register_strategy("balanced", needs_selection=True)
def draw_balanced(
    keys: np.ndarray,
    data_ratio: float,
    seed: int,
    epoch: int,
    selection: Selection,
    sharpness: float = DEFAULT_SHARPNESS,
) -> np.ndarray:
    """``floor(r*N)`` keys spread evenly across k-means clusters (:func:`balanced_counts`), sorted."""
    cluster = _aligned(keys, selection, "balanced").cluster.astype(np.int64)
    generator = np.random.default_rng([seed, epoch])
    counts = balanced_counts(
        np.bincount(cluster, minlength=selection.num_clusters), subset_size(len(keys), data_ratio), generator
    )
    shuffled = generator.permutation(len(keys))
    order = shuffled[np.argsort(cluster[shuffled], kind="stable")]  # clusters contiguous, random order inside
    starts = np.searchsorted(cluster[order], np.arange(selection.num_clusters))
    rank = np.arange(len(order)) - starts[cluster[order]]
    return np.sort(keys[order[rank < counts[cluster[order]]]])


def _draw_weighted(
    keys: np.ndarray, data_ratio: float, seed: int, epoch: int, selection: Selection, sharpness: float, strategy: str
) -> np.ndarray:
    similarity = _aligned(keys, selection, strategy).similarity
    ascending = np.argsort(similarity, kind="stable")
    percentile = np.empty(len(keys), np.float64)
    percentile[ascending] = np.arange(len(keys)) / max(len(keys) - 1, 1)  # 1: most similar to its centroid
    favour = percentile if strategy == "prototypical" else 1.0 - percentile
    generator = np.random.default_rng([seed, epoch])
    race = sharpness * favour + generator.gumbel(size=len(keys))  # Gumbel top-B = sampling without replacement
    size = subset_size(len(keys), data_ratio)
    chosen = np.argpartition(-race, size - 1)[:size] if size < len(keys) else np.arange(len(keys))
    return np.sort(keys[chosen])


@register_strategy("prototypical", needs_selection=True)
def draw_prototypical(
    keys: np.ndarray,
    data_ratio: float,
    seed: int,
    epoch: int,
    selection: Selection,
    sharpness: float = DEFAULT_SHARPNESS,
) -> np.ndarray:
    """``floor(r*N)`` keys, weighted towards images close to their cluster's centroid, sorted."""
    return _draw_weighted(keys, data_ratio, seed, epoch, selection, sharpness, "prototypical")


@register_strategy("hard", needs_selection=True)
def draw_hard(
    keys: np.ndarray,
    data_ratio: float,
    seed: int,
    epoch: int,
    selection: Selection,
    sharpness: float = DEFAULT_SHARPNESS,
) -> np.ndarray:
    """``floor(r*N)`` keys, weighted towards images far from their cluster's centroid, sorted."""
    return _draw_weighted(keys, data_ratio, seed, epoch, selection, sharpness, "hard")


@dataclass(frozen=True)
class SubsetStrategy:
    """A registered draw rule with what it needs.

    Attributes:
        name: a name in :data:`SUBSET_STRATEGIES`.
        selection: the stored selection (None for a rule without ``needs_selection``, e.g. ``random``).
        sharpness: weight sharpness of ``prototypical`` / ``hard``.

    Raises:
        rela_convert.registry.RegistryError: unknown name (a ValueError listing the registered ones).
    """

    name: str = "random"
    selection: Selection | None = None
    sharpness: float = DEFAULT_SHARPNESS

    def __post_init__(self) -> None:
        SUBSET_STRATEGIES.get(self.name)

    @property
    def needs_selection(self) -> bool:
        return SUBSET_STRATEGIES.get(self.name).needs_selection

    def draw(self, keys: np.ndarray, data_ratio: float, seed: int, epoch: int) -> np.ndarray:
        """The sorted, distinct keys epoch ``epoch`` trains on (deterministic in ``(seed, epoch)``).

        Raises:
            SelectionError: the rule needs a selection and has none, or one for other keys.
        """
        rule = SUBSET_STRATEGIES.get(self.name)
        selection = _aligned(keys, self.selection, self.name) if rule.needs_selection else None
        return rule(keys, data_ratio, seed, epoch, selection, self.sharpness)


def load_strategy(
    root: str | Path, index: DatasetIndex, name: str | None = None, keys: np.ndarray | None = None
) -> SubsetStrategy:
    """The subset strategy ``name`` (None: the dataset's recorded default, ``index.subset["strategy"]``)
    of the converted dataset at ``root`` with index ``index``; ``keys`` (int64 ``[N]``, ``keys.npy``)
    is read from ``root`` when None and needed.

    Raises:
        ValueError: unknown strategy.
        SelectionError: the strategy needs a selection the dataset does not hold (or a stale one).
    """
    name = name or index.subset["strategy"]
    if not SUBSET_STRATEGIES.get(name).needs_selection:  # unknown name: RegistryError (a ValueError)
        return SubsetStrategy(name)
    return SubsetStrategy(
        name, load_selection(root, index, keys), float(index.subset.get("sharpness", DEFAULT_SHARPNESS))
    )
