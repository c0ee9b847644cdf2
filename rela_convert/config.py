"""The options of ``rela convert`` (:class:`ConvertOptions`) and ``rela select`` (:class:`SelectionOptions`),
declared once.

Each field is declared with :func:`rela_convert.options.option`: its default, its help (with units) and its allowed
values; the click options, ``--help`` and ``--config`` keys of the two commands and the checks of options given in
Python (:func:`rela_convert.options.check`) come from these declarations. Importing this module imports nothing heavy
(no torch, no faiss), so that ``rela --help`` stays fast: choices defined in heavy modules are named as
``"module:attribute"``.
"""

from __future__ import annotations

from dataclasses import dataclass

from rela_convert import clustering
from rela_convert.dataset.selection_file import DEFAULT_SHARPNESS
from rela_convert.dedup import DEFAULT_EPS
from rela_convert.options import option

#: Where the subset strategies are registered (:data:`rela_convert.dataset.subset.SUBSET_STRATEGIES`, read lazily).
SUBSET_CHOICES = "rela_convert.dataset.subset:SUBSET_STRATEGIES"
#: What the subset strategies do, for the help of every option that names one.
SUBSET_HELP = (
    "random: a fresh uniform draw of floor(r*N) images each epoch (the paper's rule, method.md step 3). "
    "The others use a selection computed from the stored prior features with faiss (spherical k-means; "
    "rela select explains each and sets its parameters): dedup: uniform from the pool left after SemDeDup "
    "near-duplicate removal; balanced: spread evenly across k-means clusters; prototypical / hard: weighted "
    "towards images close to / far from their cluster centroid. Others: functions decorated with "
    "@register_strategy (rela_convert/dataset/subset.py)."
)
#: Where the storage formats are registered (:data:`rela_convert.dataset.formats.STORAGE_FORMATS`, read lazily).
FORMAT_CHOICES = "rela_convert.dataset.formats:STORAGE_FORMATS"
#: Where the prior's view of a JPEG is made: ``cpu`` (Pillow in the DataLoader workers) or
#: ``device`` (batched ``torchvision.io.decode_jpeg`` on the conversion device: nvJPEG on CUDA).
DECODERS = ("cpu", "device")
#: Default dimension of the selection feature space (top principal components).
DEFAULT_DIM = 512


@dataclass(frozen=True)
class ConvertOptions:
    """Options of :func:`rela_convert.convert.convert` (each field's help says what it does, in which units).

    ``formats`` are names of :data:`rela_convert.dataset.formats.STORAGE_FORMATS` (every one written, same shards);
    ``hdf5_compression`` None stores HDF5 features uncompressed; ``order_seed`` seeds the order in which samples are
    stored (:func:`rela_convert.convert.storage_order`). ``progress`` (show a progress bar) is no command-line option
    (``rela convert --quiet`` turns it off).
    """

    formats: tuple[str, ...] = option(
        ("webdataset",),
        "Shard storage formats, comma-separated: webdataset (WebDataset tar files), hdf5 (HDF5 files, one per "
        "shard), any other format of rela_convert/dataset/formats/, or both (= webdataset,hdf5). Several are "
        "written side by side (same shards, same index); trainers then read the fastest one (HDF5 before "
        "WebDataset) unless told --storage.",
        flag="--format",
        items=str,
        choices=FORMAT_CHOICES,
        aliases={"both": ("webdataset", "hdf5")},
    )
    hdf5_compression: str | None = option(
        None,
        "Compression of the HDF5 feature dataset (images are stored as they are).",
        choices=("gzip", "lzf"),
        none="none",
    )
    shard_size: int = option(5000, "Source files per shard (a shard holds at most this many samples).", min=1)
    batch_size: int = option(256, "Images per prior forward pass.", min=1)
    workers: int = option(
        2, "DataLoader worker processes (per process) that read and decode images (0: in the main process).", min=0
    )
    device: str = option(
        "auto", "auto (CUDA when available), cpu, cuda or cuda:N. CUDA runs the prior in bf16 autocast, channels-last."
    )
    decode: str = option(
        "cpu",
        "Where JPEGs are decoded and resized for the prior: cpu (Pillow in the --workers processes, reduced-DCT "
        "decoding of large JPEGs) or device (batched torchvision decode_jpeg on --device: nvJPEG on a GPU, so the "
        "workers only read files; PNG/WebP/BMP and CMYK JPEGs still decode in the workers). Pixels differ by about "
        "a grey level between the two (more for JPEGs twice the prior's size or larger, which cpu decodes at "
        "reduced DCT scale), so features differ slightly; resuming with the other one is refused.",
        choices=DECODERS,
    )
    data_ratio: float = option(
        0.5,
        "Default data ratio r recorded in the index: each training epoch draws floor(r*N) images (the trainer may "
        "override).",
        min=0,
        max=1,
        min_open=True,
    )
    subset: str = option(
        "random",
        "Default subset strategy recorded in the index. "
        + SUBSET_HELP
        + " Computed after the PCA fit with rela select's defaults (run rela select later to change them); "
        "running convert again with another --subset only recomputes the selection.",
        choices=SUBSET_CHOICES,
    )
    seed: int = option(0, "Default seed of the per-epoch subset draws, recorded in the index.")
    order_seed: int = option(
        0,
        "Seed of the pseudo-random order in which samples are stored (numpy default_rng(seed).permutation of the "
        "sorted listing); keys stay the sorted-listing positions. Mixed shards give training batches that are "
        "uniform random samples (method.md, stage 2, Batches).",
        min=0,
    )
    progress: bool = True


@dataclass(frozen=True)
class SelectionOptions:
    """Parameters of :func:`rela_convert.selection.select` (each field's help says what it does, in which units).

    ``num_clusters`` 0 is :func:`rela_convert.clustering.default_num_clusters` of N; ``dim`` 0 keeps every
    principal component; ``storage`` None reads HDF5 when present (no image bytes to skip), else the default format.
    """

    num_clusters: int = option(
        0,
        "Spherical k-means clusters k; 0: round(sqrt(N)), at most 1,000 (71 for 5,000 images, 1,000 for ImageNet-1K).",
        flag="--clusters",
        min=0,
    )
    eps: float = option(
        DEFAULT_EPS,
        "Near-duplicates: cosine similarity of centred prior features above 1 - eps, within a cluster. "
        "0.1 suits an ImageNet prior such as efficientnet-lite0 (re-encoded / resized copies >= 0.91, "
        "distinct neighbours <= 0.71 on the ImageNet sample); coarse priors (the 64-d CIFAR ResNets) "
        "need about 0.001 and then find exact copies only.",
        flag="--dedup-eps",
        min=0,
        max=2,
        min_open=True,
        max_open=True,
    )
    dim: int = option(
        DEFAULT_DIM,
        "Selection feature dimension: top principal components of pca.npz kept (0: all). "
        "Memory is N x dim x 4 bytes (2.6 GB for ImageNet-1K at 512).",
        min=0,
    )
    niter: int = option(clustering.NITER, "k-means (Lloyd) iterations.", flag="--kmeans-iters", min=1)
    max_points_per_centroid: int = option(
        clustering.MAX_POINTS_PER_CENTROID,
        "k-means trains on a seeded sample of at most this many points per cluster (all points are then assigned).",
        min=1,
    )
    seed: int = option(
        0,
        "Seed of the k-means sample and initialisation (the per-epoch draws use the dataset's subset seed).",
        flag="--kmeans-seed",
    )
    sharpness: float = option(
        DEFAULT_SHARPNESS,
        "prototypical / hard: draw weight exp(sharpness x rank percentile); the favoured extreme is "
        "e^sharpness times as likely to be drawn first (0: uniform).",
        min=0,
    )
    storage: str | None = option(
        None,
        "Stored format to read the features from. "
        "[default: the fastest one the dataset holds: hdf5 when present (no image bytes to read past)]",
        choices=FORMAT_CHOICES,
    )
