"""Where a DataLoader worker's CPU time goes with the DALI views (``rela train --augment dali``, issue 31): one
process, one thread, the stages of :class:`rela_train.dali_views.DaliViews` timed one by one on every full batch of
a converted dataset's tar shards (crop + flip views: ``RandomResizedCrop(S)`` scale (0.08, 1), horizontal flip).

Prints CPU microseconds per image for: reading the samples (rela's tar reader), the per-image seeds, the shapes
pipeline (``fn.peek_image_shape``), the parameter draws (``DeviceView.sample`` with ``KeyedDraws``, both views),
feeding DALI, DALI's views pipeline, and copying the views into torch tensors.

Usage: ``.venv/bin/python benchmarks/dali_stages.py DATA [--size 32] [--batch-size 64]`` (DATA: a dataset converted
with ``--format webdataset``, e.g. ``rela convert .cache/cifar10/train DATA --prior cifar-resnet:20:<weights>``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from rela_convert.dataset.converted import ConvertedDataset
from rela_train.dali_views import DaliViews
from rela_train.data.batch import sample_seed
from rela_train.data.shards import ShardReader
from rela_train.draws import KeyedDraws
from rela_train.views import ViewParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="converted dataset folder (tar shards)")
    parser.add_argument("--size", type=int, default=32, help="view side S, pixels (default 32)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dataset, batch = ConvertedDataset(args.data, "webdataset"), args.batch_size
    started = time.process_time()
    every = np.ones(int(dataset.keys.max()) + 1, dtype=bool)
    samples = list(ShardReader(dataset).read(list(range(len(dataset.shards))), every, {}))
    read = (time.process_time() - started) / len(samples)
    params = ViewParams(args.size, crop_scale=(0.08, 1.0), jitter_prob=0, grey_prob=0)
    views = DaliViews(params, params, batch)
    views([sample["image"] for sample in samples[:batch]], list(range(batch)))  # builds the pipelines
    shapes, pipeline = views.pipelines
    spent = dict.fromkeys(("seeds", "shapes", "draws", "feed", "views", "copy"), 0.0)

    def timed(stage: str, work):
        started = time.process_time()
        result = work()
        spent[stage] += time.process_time() - started
        return result

    count = len(samples) // batch * batch
    for start in range(0, count, batch):
        chunk = samples[start : start + batch]
        seeds = timed("seeds", lambda: [sample_seed(0, 0, sample["key"]) for sample in chunk])
        encoded = [np.frombuffer(sample["image"], dtype=np.uint8) for sample in chunk]

        def peek():
            shapes.feed_input("encoded", encoded)
            return torch.from_numpy(shapes.run()[0].as_array()[:, :2].astype(np.int64))

        sizes = timed("shapes", peek)

        def draw():
            draws, both = KeyedDraws(seeds), torch.cat([sizes, sizes], dim=1)
            return [view.arguments(view.sampler.sample(both, draws)) for view in views.views]

        arguments = timed("draws", draw)

        def feed():
            pipeline.feed_input("encoded", encoded)
            for named in arguments:
                for name, values in named.items():
                    pipeline.feed_input(name, values)

        timed("feed", feed)
        outputs = timed("views", pipeline.run)
        timed("copy", lambda: [views._tensor(output) for output in outputs])
    print(f"{count} images at {args.size} px, batch {batch}: CPU us per image")
    print(
        f"  read (tar) {read * 1e6:.1f}", *(f"{stage} {seconds / count * 1e6:.1f}" for stage, seconds in spent.items())
    )


if __name__ == "__main__":
    main()
