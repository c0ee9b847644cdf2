"""The converted dataset on disk: the contract stage 1 writes and stage 2 reads.

One module per file kind or concern, each importable without the other stage:

- :mod:`.files`: atomic writes, SHA-256 and :class:`~.files.DatasetError`, what every file goes through;
- :mod:`.index`: ``index.json`` (:class:`~.index.DatasetIndex`), the description of the dataset;
- :mod:`.formats`: the shard files, one module per storage format (WebDataset tar, HDF5, ...);
- :mod:`.pca`: ``pca.npz``, the prior features' PCA statistics;
- :mod:`.selection_file`: ``selection.npz``; :mod:`.subset`: the per-epoch subset draws that read it;
- :mod:`.converted`: :class:`~.converted.ConvertedDataset`, a dataset opened for reading (index, keys, PCA);
- :mod:`.remote` and :mod:`.shard_cache`: a dataset at a URL, read through fsspec and cached shard by shard;
- :mod:`.verify`: proving a dataset intact against its index (``rela inspect --verify``).
"""
