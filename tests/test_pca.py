"""PCA targets (method.md, stage 1, step 2) fitted from real prior features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rela_convert.dataset.formats import STORAGE_FORMATS
from rela_convert.dataset.index import DatasetIndex
from rela_convert.dataset.pca import FeatureMoments, PCAStatistics


@pytest.fixture(scope="module")
def features_and_pca(converted_cifar):
    index = DatasetIndex.load(converted_cifar)
    format = STORAGE_FORMATS.get(index.storage)
    features = np.concatenate([format.read_features(converted_cifar / shard["name"])[1] for shard in index.shards()])
    return features, PCAStatistics.load(converted_cifar / index.pca["file"])


def test_eigenvalues_match_the_covariance(features_and_pca):
    features, pca = features_and_pca
    assert pca.count == len(features) == 200
    assert np.allclose(pca.mean, features.astype(np.float64).mean(0))
    expected = np.linalg.eigvalsh(np.cov(features.astype(np.float64), rowvar=False, bias=True))[::-1]
    assert np.all(np.diff(pca.eigenvalues) <= 0)  # top eigenvalues first
    assert np.allclose(pca.eigenvalues, np.clip(expected, 0, None), atol=1e-9 * expected[0])
    assert np.allclose(pca.components.T @ pca.components, np.eye(64), atol=1e-8)


@pytest.mark.parametrize("target_dim", [8, 32, 64, 512, 2048])
def test_targets_are_standardised_principal_components(features_and_pca, target_dim):
    features, pca = features_and_pca
    targets = pca.targets(torch.from_numpy(features), target_dim).double().numpy()
    d = min(target_dim, 64)
    assert targets.shape == (200, d)
    live = pca.eigenvalues[:d] > 1e-10 * pca.eigenvalues[0]
    assert live[:8].all()
    assert np.allclose(targets.mean(0), 0, atol=1e-4)
    assert np.allclose(targets.var(0)[live], 1, atol=1e-3)
    assert np.all(targets[:, ~live] == 0)
    # Independent check: the SVD of the centred features gives the same columns up to sign.
    centred = features.astype(np.float64) - features.astype(np.float64).mean(0)
    left, singular, _ = np.linalg.svd(centred, full_matrices=False)
    distinct = np.r_[True, np.abs(np.diff(singular)) > 1e-3 * singular[0]][:d] & live
    reference = left[:, :d] * np.sqrt(len(features))
    assert np.allclose(np.abs(targets[:, distinct]), np.abs(reference[:, distinct]), atol=2e-3)


def test_moments_merge_across_blocks(features_and_pca):
    features, pca = features_and_pca
    merged = FeatureMoments.of(features[:77])
    merged += FeatureMoments.of(features[77:])
    whole = FeatureMoments.of(features)
    assert merged.count == whole.count == 200
    assert np.allclose(merged.total, whole.total) and np.allclose(merged.outer, whole.outer)
    assert np.allclose(PCAStatistics.fit(merged).eigenvalues, pca.eigenvalues, atol=1e-9 * pca.eigenvalues[0])
    with pytest.raises(ValueError, match="at least 2 features"):
        PCAStatistics.fit(FeatureMoments.of(features[:1]))
