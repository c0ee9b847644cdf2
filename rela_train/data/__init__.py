"""The training data: converted shards streamed into batches (webdataset pipeline style), one module per concept.

- :mod:`.plan`: the epoch plan: which samples each rank and DataLoader worker trains on, in which order;
- :mod:`.shards`: reading a worker's shards, checked against the index, from a folder or a URL;
- :mod:`.batch`: one step's batch, and the seeding that makes a sample's views a function of (seed, epoch, key);
- :mod:`.stream`: the stream the trainer drives (epoch, phase, DataLoader) and the loop each worker runs.

The dataset itself (index, keys, PCA statistics) is opened by :class:`rela_convert.dataset.converted.ConvertedDataset`.
"""
