"""Benchmark (issue 5): time and peak memory of the subset selection (k-means + dedup) at scale.

For synthetic 512-d features of 100k, 300k and 1M images (defaults), each size in
its own process so that its peak memory is its own, this runs the code of
``rela select`` (:mod:`rela_convert.selection`) on features generated shard by
shard (5,000 rows, as conversion stores them), never as one raw ``[N, D]`` array:

- project: centre + PCA projection to ``dim`` (default 512) + L2 normalisation, per shard;
- k-means: faiss spherical k-means on the capped sample (default k = round(sqrt(N)),
  at most 1,000; 256 points per centroid), then the exact assignment of all N;
- dedup: the per-cluster SemDeDup range search (eps 0.1).

The synthetic data: 1,000 Gaussian modes (unit-variance noise around random
centres, same-mode cosine about 0.5) with 1% planted near-duplicates (a row of the
same shard plus 5% noise, cosine about 0.999), so dedup has work and its recall
is checked. Reading features from disk is not part of the figures (HDF5 shards:
N x D x 4 bytes sequentially; tar shards: the whole tar, images included).

Peak memory: the child's ``ru_maxrss`` and its RSS after imports (torch, faiss,
numpy); the difference is the selection's working set. The script then
extrapolates to ImageNet-1K (1,281,167 x 2048 features, dim 512, k = 1,000)
from the largest run: projection ~ N x D, k-means training ~ sample x k (the
same 256,000 x 1,000 for 1M and ImageNet), assignment ~ N x k, dedup ~ N^2 / k
(sum of squared cluster sizes), working memory ~ N; from the 1M run that is
x 5.1, x 1, x 1.28, x 1.64 and x 1.28.

Usage, from the project root (about 5 minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/selection.py [--sizes 100000,300000,1000000] [--dim 512]
                                             [--out benchmarks/results/selection.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
IMAGENET = 1_281_167
IMAGENET_DIM = 2048
SHARD_ROWS = 5000
FEATURE_DIM = 512
MODES = 1000


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(num_samples: int, dim: int, clusters: int, seed: int = 0) -> dict:
    """Run the selection on synthetic features in this process; return the figures."""
    sys.path.insert(0, str(PROJECT))
    import numpy as np

    from rela_convert import clustering
    from rela_convert.dataset.pca import FeatureMoments, PCAStatistics
    from rela_convert.dedup import DEFAULT_EPS, deduplicate
    from rela_convert.selection import SelectionSpace

    baseline = rss_mb()
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(MODES, FEATURE_DIM)).astype(np.float32)

    def shard(number: int) -> tuple[np.ndarray, np.ndarray]:
        """One shard of synthetic features and the rows that are planted near-duplicates."""
        generator = np.random.default_rng([seed, number])
        rows = min(SHARD_ROWS, num_samples - number * SHARD_ROWS)
        features = centres[generator.integers(0, MODES, rows)] + generator.normal(size=(rows, FEATURE_DIM)).astype(
            np.float32
        )
        planted = np.sort(generator.choice(np.arange(1, rows), size=rows // 100, replace=False))
        sources = generator.integers(0, planted)  # an earlier row of the shard
        features[planted] = features[sources] + 0.05 * generator.normal(size=(len(planted), FEATURE_DIM)).astype(
            np.float32
        )
        return features, planted

    # PCA statistics come from conversion; here from the first 20,000 rows (4 shards).
    moments = FeatureMoments.zeros(FEATURE_DIM)
    for number in range(min(4, -(-num_samples // SHARD_ROWS))):
        moments += FeatureMoments.of(shard(number)[0])
    space = SelectionSpace.from_pca(PCAStatistics.fit(moments), dim)

    features = np.empty((num_samples, space.dim), np.float32)
    planted_rows, generate_seconds, project_seconds = [], 0.0, 0.0
    for number in range(-(-num_samples // SHARD_ROWS)):
        started = time.perf_counter()
        raw, planted = shard(number)
        generate_seconds += time.perf_counter() - started
        started = time.perf_counter()
        features[number * SHARD_ROWS : number * SHARD_ROWS + len(raw)] = space.project(raw)
        project_seconds += time.perf_counter() - started
        planted_rows.append(planted + number * SHARD_ROWS)
        del raw
    planted_rows = np.concatenate(planted_rows)

    k = clusters or clustering.default_num_clusters(num_samples)
    result = clustering.spherical_kmeans(features, k)
    started = time.perf_counter()
    dedup = deduplicate(features, result.cluster, np.arange(num_samples), DEFAULT_EPS)
    dedup_seconds = time.perf_counter() - started
    sizes = np.bincount(result.cluster, minlength=k).astype(np.float64)
    removed = np.flatnonzero(~dedup.keep)
    return {
        "num_samples": num_samples,
        "feature_dim": FEATURE_DIM,
        "dim": space.dim,
        "num_clusters": k,
        "train_points": result.train_points,
        "seconds": {
            "generate (not counted)": generate_seconds,
            "project": project_seconds,
            "kmeans_train": result.seconds["train"],
            "kmeans_assign": result.seconds["assign"],
            "dedup": dedup_seconds,
            "total": project_seconds + result.seconds["train"] + result.seconds["assign"] + dedup_seconds,
        },
        "memory_mb": {
            "baseline_after_imports": baseline,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "held_features": features.nbytes / 2**20,
        },
        "dedup": {
            "planted": len(planted_rows),
            "removed": len(removed),
            "recall": float(np.isin(planted_rows, removed).mean()),
            "precision": float(np.isin(removed, planted_rows).mean()) if len(removed) else 1.0,
        },
        "cluster_skew": float((sizes**2).sum() / (num_samples**2 / k)),  # sum n_c^2 relative to equal clusters
        "faiss_gpus": result.gpus,
    }


def extrapolate(run: dict) -> dict:
    """ImageNet-1K (1,281,167 x 2048 -> dim 512, k = 1,000, k-means sample 256,000) from one run:
    projection ~ N x D, k-means training ~ sample x k, assignment ~ N x k, dedup ~ N^2 / k."""
    k = min(1000, round(IMAGENET**0.5))
    scale = IMAGENET / run["num_samples"]
    seconds = run["seconds"]
    estimate = {
        "project": seconds["project"] * scale * IMAGENET_DIM / run["feature_dim"],
        "kmeans_train": seconds["kmeans_train"]
        * (min(IMAGENET, 256 * k) * k)
        / (run["train_points"] * run["num_clusters"]),
        "kmeans_assign": seconds["kmeans_assign"] * scale * k / run["num_clusters"],
        "dedup": seconds["dedup"] * scale**2 * run["num_clusters"] / k,
    }
    estimate["total"] = sum(estimate.values())
    working = run["memory_mb"]["peak"] - run["memory_mb"]["baseline_after_imports"]
    return {
        "num_samples": IMAGENET,
        "feature_dim": IMAGENET_DIM,
        "dim": run["dim"],
        "num_clusters": k,
        "seconds": estimate,
        "memory_mb": {
            "held_features": IMAGENET * run["dim"] * 4 / 2**20,
            "working_set": working * scale,
            "peak": run["memory_mb"]["baseline_after_imports"] + working * scale,
        },
        "not_included": (
            "reading the features from the shards: 10.5 GB of float32 from HDF5 shards, or the whole tar shards "
            "(images included) from WebDataset"
        ),
        "from": f"{run['num_samples']} x {run['feature_dim']} run",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,300000,1000000", help="comma-separated numbers of images")
    parser.add_argument("--dim", type=int, default=512, help="selection dimension (rela select --dim)")
    parser.add_argument("--clusters", type=int, default=0, help="k (0: the default rule)")
    parser.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "results" / "selection.json")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dim, args.clusters)))
        return
    runs = []
    print(
        f"{'N':>9} {'k':>5} {'project s':>9} {'kmeans train s':>14} {'assign s':>8} {'dedup s':>7} {'total s':>7} "
        f"{'peak MB':>8} {'working MB':>10} {'dedup P/R':>10}",
        flush=True,
    )
    for size in [int(value) for value in args.sizes.split(",")]:
        output = subprocess.run(
            [sys.executable, __file__, "--child", str(size), "--dim", str(args.dim), "--clusters", str(args.clusters)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        run = json.loads(output.strip().splitlines()[-1])
        runs.append(run)
        seconds, memory = run["seconds"], run["memory_mb"]
        print(
            f"{size:>9} {run['num_clusters']:>5} {seconds['project']:>9.1f} {seconds['kmeans_train']:>14.1f} "
            f"{seconds['kmeans_assign']:>8.1f} {seconds['dedup']:>7.1f} {seconds['total']:>7.1f} "
            f"{memory['peak']:>8.0f} {memory['peak'] - memory['baseline_after_imports']:>10.0f} "
            f"{run['dedup']['precision']:.3f}/{run['dedup']['recall']:.3f}",
            flush=True,
        )
    largest = max(runs, key=lambda run: run["num_samples"])
    imagenet = extrapolate(largest)
    seconds, memory = imagenet["seconds"], imagenet["memory_mb"]
    print(
        f"ImageNet-1K estimate ({IMAGENET} x {IMAGENET_DIM} -> dim {imagenet['dim']}, k {imagenet['num_clusters']}, "
        f"from the {imagenet['from']}): project {seconds['project']:.0f} s, k-means train "
        f"{seconds['kmeans_train']:.0f} s, assign {seconds['kmeans_assign']:.0f} s, dedup {seconds['dedup']:.0f} s, "
        f"total {seconds['total']:.0f} s ({seconds['total'] / 60:.1f} min); peak memory {memory['peak'] / 1024:.1f} GB "
        f"(features held {memory['held_features'] / 1024:.1f} GB); plus reading the features from the shards"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with other jobs",
                "runs": runs,
                "imagenet_1k_estimate": imagenet,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
