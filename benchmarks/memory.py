"""Benchmark 2 (issue 4): peak memory of ``rela convert`` on 5k versus 50k CIFAR-10 images.

Each conversion runs as a separate ``rela convert`` process (the real command
line, progress bar off). While it runs, its process tree (the command and its
DataLoader workers) is sampled every ``--interval`` seconds from ``/proc``:

- tree PSS: the sum of the processes' proportional set sizes (``smaps_rollup``),
  i.e. the RAM the conversion occupies, shared pages (forked workers, the
  torch libraries) counted once. This is the figure the ratio is taken on.
- tree RSS: the sum of resident sets (shared pages counted in every process;
  an upper bound);
- main RSS: the peak resident set of the ``rela convert`` process alone
  (``VmHWM``), and the largest peak of any single process of the tree
  (``getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a launcher that only waits for it).

Goal: peak(50k) / peak(5k) <= 1.25 (features stream into shards and running
float64 sums; nothing ``[N, D]`` is held). The script then estimates what
ImageNet-1K with a 2048-d prior needs from the converter's data structures.

Then the same for ``rela train``'s reader (marked TRAINING READER below): one
epoch of the shard stream ``rela train`` consumes, over each conversion, with the
same workers (``--no-train-reader`` skips it).

Usage, from the project root::

    python benchmarks/memory.py [--sizes 5000,50000] [--prior SPEC] [--workers 2] [--batch-size 256]
                                [--train-batch-size 128] [--no-train-reader] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _data import CIFAR_PRIOR, PROJECT, RESULTS, cifar_subset, machine, write_json

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024

#: Runs the command given as arguments and prints the largest ru_maxrss (KiB) of its process tree.
LAUNCHER = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call(sys.argv[1:])\n"
    "print('MAXRSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True)\n"
    "sys.exit(code)\n"
)


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # the command name (field 2) may hold spaces and parentheses: split after the last ')'
        parent = int(stat[stat.rindex(b")") + 2 :].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    tree, found, todo = _children(), [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def _field_kib(path: str, name: bytes) -> int:
    """A ``Name:  123 kB`` field of a /proc status-like file, KiB (0 when gone)."""
    try:
        with open(path, "rb") as handle:
            for line in handle:
                if line.startswith(name):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def sample_tree(pid: int) -> tuple[int, int, int]:
    """(tree PSS, tree RSS, VmHWM of ``pid``) in bytes, at this instant."""
    pss = rss = 0
    for process in descendants(pid):
        pss += _field_kib(f"/proc/{process}/smaps_rollup", b"Pss:") * 1024
        rss += _field_kib(f"/proc/{process}/status", b"VmRSS:") * 1024
    return pss, rss, _field_kib(f"/proc/{pid}/status", b"VmHWM:") * 1024


def rela_command() -> list[str]:
    """How to start ``rela`` with this interpreter (the console script beside it, else ``-m cli``)."""
    script = Path(sys.executable).with_name("rela")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "cli"]


def measure_process(command: list[str], interval: float) -> dict:
    """Run ``command`` (through a launcher that reports the largest ``ru_maxrss`` of its tree)
    and sample the memory of its process tree until it ends.

    Raises:
        RuntimeError: the command failed (its output is in the message).
    """
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, *command],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = time.perf_counter()
    peak_pss = peak_rss = main_hwm = 0
    samples = 0
    while launcher.poll() is None:
        pids = [pid for pid in descendants(launcher.pid) if pid != launcher.pid]
        if pids:
            main = min(pids)  # the launcher's direct child starts first
            pss, rss, hwm = sample_tree(main)
            peak_pss, peak_rss, main_hwm = max(peak_pss, pss), max(peak_rss, rss), max(main_hwm, hwm)
            samples += 1
        time.sleep(interval)
    seconds = time.perf_counter() - started
    stdout, stderr = launcher.communicate()
    if launcher.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({launcher.returncode}):\n{stderr[-3000:]}{stdout[-2000:]}")
    max_single = next((int(line.split()[1]) * 1024 for line in stdout.splitlines() if line.startswith("MAXRSS_KIB")), 0)
    return {
        "seconds": seconds,
        "memory_polls": samples,
        "peak_tree_pss_bytes": peak_pss,
        "peak_tree_rss_bytes": peak_rss,
        "peak_main_rss_bytes": main_hwm,
        "max_single_process_rss_bytes": max_single,
        "summary": next(
            (line for line in stdout.splitlines() if line.strip() and not line.startswith("MAXRSS_KIB")), ""
        ),
    }


def measure_convert(source: Path, out: Path, args) -> dict:
    """Peak memory of ``rela convert SOURCE OUT`` (the real command line, progress bar off)."""
    command = [
        *rela_command(),
        "convert",
        str(source),
        str(out),
        "--prior",
        args.prior,
        "--quiet",
        "--workers",
        str(args.workers),
        "--batch-size",
        str(args.batch_size),
    ]
    try:
        return measure_process(command, args.interval)
    except RuntimeError as error:
        raise SystemExit(f"error: {error}") from None


# ---------------------------------------------------------------------------------------------
# TRAINING READER (issue 4, benchmark 2, second half): peak memory of ``rela train``'s input
# pipeline reading the 5k versus the 50k conversion: rela_train.data.stream.TrainStream (the stream
# ``rela train`` consumes) through its own DataLoader (TrainStream.loader) with the same workers,
# one whole epoch at data ratio 1.0 (read, decode, two views, collate), in its own process
# sampled like the conversions.
# Only the reader: the network and optimiser that ``rela train`` adds do not depend on N, and an
# epoch of real training on 50k images takes too long on this machine.
# ---------------------------------------------------------------------------------------------
READER = """
import sys
from rela_convert.dataset.converted import ConvertedDataset
from rela_train.data.stream import TrainStream
from rela_train.methods.byol import BYOL

root, workers, batch_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
dataset = ConvertedDataset(root)
stream = TrainStream(
    dataset, dataset.train_size, BYOL.views(dataset.train_size), data_ratio=1.0, seed=0, batch_size=batch_size
)
count = 0
for batch in stream.loader(workers):
    count += len(batch[-1])
print(f"read {count} samples (two views each) of {dataset.num_samples}")
"""


def measure_train_reader(converted: dict[int, Path], args) -> list[dict] | None:
    """Peak memory of one epoch of the training reader on every conversion; None when
    ``rela_train`` cannot run it here (the reason is printed)."""
    rows = []
    for size, out in converted.items():
        print(f"rela train reader, {size} samples ...", flush=True)
        try:
            result = measure_process(
                [sys.executable, "-c", READER, str(out), str(args.workers), str(args.train_batch_size)], args.interval
            )
        except RuntimeError as error:
            print(f"  skipped: the training reader did not run: {str(error).strip().splitlines()[-1]}")
            return None
        rows.append({"samples": size, **result})
        print(
            f"  {size} samples in {result['seconds']:.1f} s: tree PSS {result['peak_tree_pss_bytes'] / MIB:.0f} MiB, "
            f"main RSS {result['peak_main_rss_bytes'] / MIB:.0f} MiB",
            flush=True,
        )
    return rows


#: Live activations per image of a ResNet-50 forward at 224 px on the CPU, measured here
#: (``ru_maxrss`` after one forward of rand:resnet50@224: +723 MiB at batch 64, +498 MiB at 32, +159 MiB at 8).
RESNET50_ACTIVATION_BYTES = {64: 723 * MIB / 64, 8: 159 * MIB / 8}


def imagenet_estimate(
    args, listing_bytes_per_file: float, jpeg_bytes: float, baseline_bytes: float
) -> list[tuple[str, float, str]]:
    """(item, bytes, arithmetic) for converting ImageNet-1K with a 2048-d, 224 px prior,
    from the converter's data structures (rela_convert/convert.py, dataset/pca.py) and its defaults."""
    n, d, s = 1_281_167, 2048, 224
    shard, batch, workers, prefetch = 5000, args.batch_size, args.workers, 4
    block = 1024  # rela_convert.dataset.pca.BLOCK_ROWS
    pixels = 3 * s * s
    items = [
        (
            "listing: SourceFile objects (main)",
            n * listing_bytes_per_file,
            f"{n:,} files x {listing_bytes_per_file:.0f} B (measured on the 50k CIFAR listing)",
        ),
        (
            "listing: copies in workers (copy-on-write touched by refcounts)",
            workers * n * listing_bytes_per_file,
            f"up to {workers} workers x the listing",
        ),
        ("batch plan (lists of keys)", n * 36, f"{n:,} keys x ~36 B (list slot + int object)"),
        ("shard feature rows (ShardStream.features)", shard * d * 4, f"{shard} rows x {d} x 4 B float32"),
        ("np.stack of the shard at its end", shard * d * 4, "one copy of the rows above"),
        ("FeatureMoments.of: float64 block", block * d * 8, f"{block} rows x {d} x 8 B"),
        ("running sum of outer products [D, D] float64", d * d * 8, f"{d}^2 x 8 B"),
        ("this shard's [D, D] float64 moments + matmul temporary", 2 * d * d * 8, f"2 x {d}^2 x 8 B"),
        (
            "PCA fit at the end (covariance, eigh workspace, vectors)",
            4 * d * d * 8,
            f"~4 x {d}^2 x 8 B (transient, after the last shard)",
        ),
        (
            "batches in flight (workers x prefetch_factor)",
            workers * prefetch * batch * (pixels + jpeg_bytes),
            f"{workers} x {prefetch} x {batch} x ({pixels:,} B pixels + {jpeg_bytes:,.0f} B JPEG)",
        ),
        (
            "batch in the main process (pixels as float, normalised)",
            batch * pixels * (1 + 4 + 4),
            f"{batch} x {pixels:,} x (1 B uint8 + 4 B float + 4 B normalised)",
        ),
        (
            "prior forward activations, whole batch on the CPU (ResNet-50)",
            batch * RESNET50_ACTIVATION_BYTES[64],
            f"{batch} images x {RESNET50_ACTIVATION_BYTES[64] / MIB:.1f} MiB (measured at batch 64); passes of 8 "
            f"images: {8 * RESNET50_ACTIVATION_BYTES[8] / MIB:.0f} MiB",
        ),
        ("keys of all samples at the end (list + int64 array)", n * (36 + 8), f"{n:,} x (36 + 8) B"),
        (
            "interpreter, torch, workers, CIFAR prior (the smallest run's peak tree PSS)",
            baseline_bytes,
            "measured above",
        ),
        ("ResNet-50 weights (shared with the forked workers)", 98 * MIB, "25.6 M parameters x 4 B"),
    ]
    return items


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="5000,50000", help="comma-separated numbers of CIFAR-10 train images (default 5000,50000)"
    )
    parser.add_argument("--prior", default=CIFAR_PRIOR, help="prior spec (default the CIFAR ResNet-20, 64-d)")
    parser.add_argument("--workers", type=int, default=2, help="rela convert --workers (default 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="rela convert --batch-size (default 256)")
    parser.add_argument(
        "--train-batch-size", type=int, default=128, help="batch of the training reader (default 128, rela train's)"
    )
    parser.add_argument("--no-train-reader", action="store_true", help="measure the conversions only")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples (default 0.05)")
    parser.add_argument(
        "--out",
        type=Path,
        default=RESULTS / "memory.json",
        help="JSON result file (default benchmarks/results/memory.json)",
    )
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]

    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} cores; load {info['load_average_1min_at_start']:.2f}; prior "
        f"{args.prior}"
    )
    rows = []
    converted: dict[int, Path] = {}
    with tempfile.TemporaryDirectory(prefix="rela-bench-memory-") as temporary:
        scratch = Path(temporary)
        for size in sizes:
            source = cifar_subset(size, scratch / f"cifar-{size}")
            out = scratch / f"converted-{size}"
            print(f"rela convert {size} images ...", flush=True)
            result = measure_convert(source, out, args)
            converted[size] = out
            rows.append({"images": size, **result})
            print(
                f"  {size} images in {result['seconds']:.1f} s: tree PSS {result['peak_tree_pss_bytes'] / MIB:.0f} "
                f"MiB, tree RSS {result['peak_tree_rss_bytes'] / MIB:.0f} MiB, main RSS "
                f"{result['peak_main_rss_bytes'] / MIB:.0f} MiB",
                flush=True,
            )
        train_reader = None if args.no_train_reader else measure_train_reader(converted, args)

        # Bytes per listed file, measured (feeds the ImageNet-1K estimate).
        import tracemalloc

        from rela_convert.tree import scan_tree

        tracemalloc.start()
        listing = scan_tree(scratch / f"cifar-{max(sizes)}")
        listing_bytes = tracemalloc.get_traced_memory()[0] / max(len(listing.files), 1)
        tracemalloc.stop()
        del listing
    from _data import imagenet_sample

    jpegs = sorted(imagenet_sample().iterdir())
    jpeg_bytes = sum(path.stat().st_size for path in jpegs) / len(jpegs)

    small, large = rows[0], rows[-1]
    ratios = {
        key: large[key] / small[key]
        for key in ("peak_tree_pss_bytes", "peak_tree_rss_bytes", "peak_main_rss_bytes", "max_single_process_rss_bytes")
        if small[key]
    }
    print()
    header = (
        f"{'images':>7s} {'seconds':>8s} {'tree PSS MiB':>13s} {'tree RSS MiB':>13s} {'main RSS MiB':>13s} "
        f"{'max proc MiB':>13s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['images']:7d} {row['seconds']:8.1f} {row['peak_tree_pss_bytes'] / MIB:13.0f} "
            f"{row['peak_tree_rss_bytes'] / MIB:13.0f} {row['peak_main_rss_bytes'] / MIB:13.0f} "
            f"{row['max_single_process_rss_bytes'] / MIB:13.0f}"
        )
    print(
        f"{'ratio':>7s} {'':8s} {ratios.get('peak_tree_pss_bytes', 0):13.2f} "
        f"{ratios.get('peak_tree_rss_bytes', 0):13.2f} {ratios.get('peak_main_rss_bytes', 0):13.2f} "
        f"{ratios.get('max_single_process_rss_bytes', 0):13.2f}"
    )
    print(
        f"goal: rela convert tree PSS ratio {large['images']}/{small['images']} <= 1.25: "
        f"{'met' if ratios.get('peak_tree_pss_bytes', 99) <= 1.25 else 'NOT met'}"
    )
    train_ratios = {}
    if train_reader:
        first, last = train_reader[0], train_reader[-1]
        train_ratios = {
            key: last[key] / first[key]
            for key in ("peak_tree_pss_bytes", "peak_tree_rss_bytes", "peak_main_rss_bytes")
            if first[key]
        }
        print()
        header = f"{'reader':>7s} {'seconds':>8s} {'tree PSS MiB':>13s} {'tree RSS MiB':>13s} {'main RSS MiB':>13s}"
        print(header)
        print("-" * len(header))
        for row in train_reader:
            print(
                f"{row['samples']:7d} {row['seconds']:8.1f} {row['peak_tree_pss_bytes'] / MIB:13.0f} "
                f"{row['peak_tree_rss_bytes'] / MIB:13.0f} {row['peak_main_rss_bytes'] / MIB:13.0f}"
            )
        print(
            f"{'ratio':>7s} {'':8s} {train_ratios.get('peak_tree_pss_bytes', 0):13.2f} "
            f"{train_ratios.get('peak_tree_rss_bytes', 0):13.2f} {train_ratios.get('peak_main_rss_bytes', 0):13.2f}"
        )
    else:
        print("rela train reader: not measured (see TRAINING READER in benchmarks/memory.py)")

    estimate = imagenet_estimate(args, listing_bytes, jpeg_bytes, small["peak_tree_pss_bytes"])
    total = sum(value for _, value, _ in estimate)
    with_passes = total - args.batch_size * RESNET50_ACTIVATION_BYTES[64] + 8 * RESNET50_ACTIVATION_BYTES[8]
    print()
    print(
        f"ImageNet-1K (1,281,167 images), 2048-d prior at 224 px, batch {args.batch_size}, {args.workers} workers, "
        "shard 5000: estimate"
    )
    for item, value, arithmetic in estimate:
        print(f"  {value / MIB:8.0f} MiB  {item}: {arithmetic}")
    print(f"  {total / MIB:8.0f} MiB  total, if every item peaked at once (an upper bound); goal < 8 GB")
    print(f"  {with_passes / MIB:8.0f} MiB  the same with the prior run in passes of 8 images on the CPU")
    payload = {
        "benchmark": "memory",
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": info,
        "options": {
            "prior": args.prior,
            "workers": args.workers,
            "batch_size": args.batch_size,
            "interval_s": args.interval,
        },
        "convert": rows,
        "ratios_large_over_small": ratios,
        "train_reader": train_reader,
        "train_reader_ratios_large_over_small": train_ratios,
        "listing_bytes_per_file": listing_bytes,
        "imagenet_sample_mean_jpeg_bytes": jpeg_bytes,
        "imagenet_1k_estimate": [
            {"item": item, "bytes": value, "arithmetic": arithmetic} for item, value, arithmetic in estimate
        ],
        "imagenet_1k_estimate_total_bytes": total,
        "imagenet_1k_estimate_total_bytes_cpu_passes_of_8": with_passes,
    }
    write_json(args.out, payload)
    return payload


if __name__ == "__main__":
    main()
