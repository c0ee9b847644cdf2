"""The GPU check (issue 20): what one lent GPU machine measures, in one command (``benchmarks/gpu/run.sh``).

Parts, in this order, each in its own process under its own time limit; each writes ``OUT/gpu-<part>.json``
as soon as it has a figure, so a run cut off still returns what it measured:

1. ``tests``: ``pytest -m cuda tests/test_cuda.py`` (bf16 autocast conversion, ``--decode device``,
   ``--augment device``, training with an exact resume, a one-process NCCL DDP run with SyncBN).
2. ``convert``: ``rela convert`` images/s of a ResNet-50-sized prior (``rand:resnet50@224``) on ImageNet JPEGs
   (the carried sample, repeated by hard links to two sizes), ``--decode cpu`` and ``--decode device``, 16
   workers; the marginal rate (extra images / extra seconds between the two sizes, so start-up cancels) and
   what bounds it: the CPU decode floor (the converter's decode + resize through a DataLoader) and the prior's
   own rate (its bf16 forward on decoded batches), each alone.
3. ``train``: training images/s of ResNet-50 at 224 px, batch 256, bf16 autocast, in the ReLA phase: on
   synthetic device tensors (the compute ceiling), with views made by the CPU workers and with views made on
   the device (goal: >= 0.9 of the synthetic rate, the input never the bottleneck); and the ReLA / BYOL
   step-rate ratio on synthetic tensors.
4. ``cifar``: the paper's CIFAR-10 setting, shortened: all 50,000 images converted with the CIFAR ResNet-56
   prior (the paper's "CF10" prior: trained with CIFAR-10 labels, so it leaks them; the fair ImageNet prior
   does not fit the 64 MiB that may travel), then ``rela study``: BYOL alone against ReLA + BYOL at 0.5 of
   its budget, ResNet-18 CIFAR stem, batch 128; kNN top-1 (10,000 test images) and wall times. Cut off, it
   returns the runs that finished.

``--dry-run``: the same parts at toy sizes on the CPU (CI runs it through ``tests/test_gpu_check.py``), so the
script cannot rot between the rare loans. The last line printed is ``gpu check: N of M parts ran``.

Usage: ``python benchmarks/gpu/check.py --out DIR [--dry-run] [--scratch DIR] [--budget SECONDS]
[--parts tests,convert,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/: _data and the CPU benchmarks whose measurements we reuse

import _data  # noqa: E402
from _data import PROJECT, cifar_root, imagenet_sample, machine  # noqa: E402

#: Seconds kept back from the budget for the summary and the transfers.
MARGIN_S = 15
#: Seconds a part has, after the SIGTERM that cuts it off, to write what it finished.
GRACE_S = 8


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: :data:`FULL` on the GPU, :data:`DRY` for ``--dry-run`` on the CPU."""

    workers: int
    convert_images: tuple[int, int]  # two sizes, for the marginal rate
    convert_prior: str
    convert_batch: int
    train_arch: str
    train_size: int  # pixels
    train_batch: int
    train_steps: int
    cifar_train: int | None  # images (None: all 50,000 / 10,000)
    cifar_test: int | None
    cifar_epochs: int
    cifar_batch: int
    cifar_stem: str  # the paper's CIFAR stem on the GPU; the ImageNet stem (16 times cheaper) for the dry run
    limits: dict  # part -> seconds (None: what is left)


FULL = Sizes(
    16, (1024, 3072), "rand:resnet50@224", 256, "resnet50", 224, 256, 12, None, None, 10, 128, "cifar",
    {"tests": 110, "convert": 110, "train": 100, "cifar": None},
)  # fmt: skip
DRY = Sizes(
    2, (8, 16), "rand:resnet18@64", 8, "resnet18", 64, 4, 2, 200, 100, 1, 32, "imagenet",
    {"tests": 1500, "convert": 300, "train": 300, "cifar": None},
)  # fmt: skip


class Report:
    """``OUT/gpu-<part>.json``, rewritten (atomically) whenever a figure is added."""

    def __init__(self, out: Path, part: str, dry_run: bool) -> None:
        self.path = out / f"gpu-{part}.json"
        self.data = {"part": part, "dry_run": dry_run, "machine": machine()}

    def update(self, **fields) -> None:
        self.data.update(fields)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=2) + "\n")
        temporary.replace(self.path)
        print(f"  {self.path.name}: {', '.join(fields)}", flush=True)


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------------------
# 1. tests


def part_tests(report: Report, sizes: Sizes, scratch: Path, dry_run: bool) -> None:
    junit = scratch / "junit.xml"
    environment = {**os.environ, **({"RELA_CUDA_TESTS_ON_CPU": "1"} if dry_run else {})}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    started = time.perf_counter()
    result = subprocess.run([*command, "tests/test_cuda.py"], cwd=PROJECT, env=environment, text=True)
    if not junit.is_file():  # pytest did not run (not installed, or it failed before collecting)
        report.update(seconds=time.perf_counter() - started, exit_status=result.returncode)
        raise SystemExit(
            f"tests: pytest did not run (exit status {result.returncode}; is pytest installed? "
            f"{sys.executable} -m pip install pytest)"
        )
    suite = ElementTree.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures = [
        {"test": case.get("name"), "message": (problem.get("message") or "").splitlines()[:1]}
        for case in suite.iter("testcase")
        for problem in case
        if problem.tag in ("failure", "error")
    ]
    counts = {name: int(suite.get(name, 0)) for name in ("tests", "failures", "errors", "skipped")}
    report.update(**counts, failed_tests=failures, seconds=time.perf_counter() - started, exit_status=result.returncode)
    if result.returncode != 0 or counts["skipped"]:
        raise SystemExit(f"tests: {len(failures)} failed, {counts['skipped']} skipped")


# ---------------------------------------------------------------------------------------------------------------
# 2. conversion


def repeated_tree(images: list[Path], count: int, target: Path) -> Path:
    """A flat folder of ``count`` hard links cycling through ``images`` (distinct names, same pixels)."""
    target.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        source = images[index % len(images)]
        link = target / f"{index:06d}_{source.name}"
        if not link.exists():
            os.link(source, link)
    return target


def part_convert(report: Report, sizes: Sizes, scratch: Path, dry_run: bool) -> None:
    import convert as convert_benchmark  # benchmarks/convert.py: the decode floor and the prior alone

    from rela_convert.config import ConvertOptions
    from rela_convert.convert import convert
    from rela_convert.priors import load_prior

    where = device()
    images = sorted(imagenet_sample().iterdir())
    small, large = sizes.convert_images
    trees = {count: repeated_tree(images, count, scratch / f"imagenet-{count}") for count in (small, large)}
    rates = {}
    for decode in ("cpu", "device"):
        seconds = {}
        for count, tree in trees.items():
            options = ConvertOptions(
                shard_size=1024, batch_size=sizes.convert_batch, workers=sizes.workers, device=str(where),
                decode=decode, progress=False,
            )  # fmt: skip
            started = time.perf_counter()
            convert(tree, scratch / f"out-{decode}-{count}", sizes.convert_prior, options)
            seconds[count] = time.perf_counter() - started
        rates[decode] = {
            "seconds": seconds,
            "images_per_s": {count: count / seconds[count] for count in seconds},
            # None: the larger conversion was not slower (timing noise swamps so few extra images)
            "marginal_images_per_s": (
                (large - small) / (seconds[large] - seconds[small]) if seconds[large] > seconds[small] else None
            ),
        }
        report.update(prior=sizes.convert_prior, workers=sizes.workers, unique_images=len(images), convert=rates)
    prior = load_prior(sizes.convert_prior)
    prior.model.to(where)
    files = sorted(trees[small].iterdir())
    case = convert_benchmark.Case("imagenet", trees[small], trees[small], sizes.convert_prior, files)
    arguments = SimpleNamespace(batch_size=sizes.convert_batch, workers=sizes.workers)
    decode_clock, batches = convert_benchmark.measure_decode(case, prior.input_size, arguments)
    prior_clock = convert_benchmark.measure_prior(prior, batches, where)
    alone = {"cpu_decode": len(files) / decode_clock.wall, "prior": len(files) / prior_clock.wall}
    best = max(rate["marginal_images_per_s"] or rate["images_per_s"][large] for rate in rates.values())
    # The stage whose rate alone is closest to the whole conversion's bounds it; far below both: writing or the
    # hand-off between them.
    bound = min(alone, key=alone.get) if best > 0.8 * min(alone.values()) else "write / hand-off"
    report.update(alone_images_per_s=alone, bound=bound)


# ---------------------------------------------------------------------------------------------------------------
# 3. training


def part_train(report: Report, sizes: Sizes, scratch: Path, dry_run: bool) -> None:
    import loader  # benchmarks/loader.py: ReLA and BYOL steps/s on synthetic device tensors
    import train_input  # benchmarks/train_input.py: training images/s with CPU views and with device views

    where = device()
    arch, size, batch, steps = sizes.train_arch, sizes.train_size, sizes.train_batch, sizes.train_steps
    rates = loader.step_rates(batch, steps, arch, size, where)
    synthetic = {"rela": rates["rela_images_per_s"], "byol": rates["byol_images_per_s"]}
    report.update(
        arch=arch, input_size=size, batch_size=batch, steps=steps, synthetic_images_per_s=synthetic,
        rela_over_byol_step_rate=rates["ratio_rela_over_byol"],
    )  # fmt: skip
    encoded = [path.read_bytes() for path in sorted(imagenet_sample().iterdir())]
    views = train_input.training(arch, size, encoded, batch, steps, sizes.workers, where)["images_per_s"]
    fraction = {augment: rate / synthetic["rela"] for augment, rate in views.items()}
    report.update(views_images_per_s=views, fraction_of_synthetic=fraction, input_bound=min(fraction.values()) < 0.9)


# ---------------------------------------------------------------------------------------------------------------
# 4. the CIFAR-10 study


def rela(*arguments: str) -> float:
    """Run one ``rela`` command in a child process; its wall seconds. Raises CalledProcessError."""
    started = time.perf_counter()
    subprocess.run([sys.executable, str(PROJECT / "cli.py"), *arguments], cwd=PROJECT, check=True)
    return time.perf_counter() - started


def finished_runs(study: Path) -> list[dict]:
    """Each finished run of a study: its summary and evaluation (what a cut-off study leaves)."""
    runs = []
    for run in sorted((study / "runs").glob("*")):
        if (run / "summary.json").is_file() and (run / "eval.json").is_file():
            summary, evaluation = (json.loads((run / name).read_text()) for name in ("summary.json", "eval.json"))
            runs.append({"run": run.name, "summary": summary, "eval": evaluation})
    return runs


def part_cifar(report: Report, sizes: Sizes, scratch: Path, dry_run: bool) -> None:
    root = cifar_root()
    train, test = root / "train", root / "test"
    if sizes.cifar_train:
        train = _data.cifar_subset(sizes.cifar_train, scratch / "cifar-train", "train")
        test = _data.cifar_subset(sizes.cifar_test, scratch / "cifar-test", "test")
    where, workers = str(device()), str(sizes.workers)
    data, study = scratch / "cifar-data", scratch / "cifar-study"
    setting = {
        "prior": f"cifar-resnet:56:{_data.RESNET56}", "method": "byol", "arch": "resnet18", "stem": sizes.cifar_stem,
        "batch_size": sizes.cifar_batch, "epochs": sizes.cifar_epochs, "ratios": "0.5", "seeds": "0",
    }  # fmt: skip
    report.update(setting=setting)
    convert_s = rela("convert", str(train), str(data), "--prior", setting["prior"], "--workers", workers,
                     "--device", where, "--quiet")  # fmt: skip
    report.update(convert_seconds=convert_s)
    arguments = [
        "study", str(data), str(study), "--train-dir", str(train), "--test-dir", str(test), "--method", "byol",
        "--arch", "resnet18", "--stem", sizes.cifar_stem, "--batch-size", str(sizes.cifar_batch), "--epochs",
        str(sizes.cifar_epochs), "--ratios", "0.5", "--seeds", "0", "--workers", workers, "--eval-workers", workers,
        "--device", where,
    ]  # fmt: skip
    try:
        study_s = rela(*arguments)
    finally:  # cut off or failed: what finished still comes back
        report.update(finished_runs=finished_runs(study))
    results = json.loads((study / "results.json").read_text())["records"]
    report.update(study_seconds=study_s, records=results, table=(study / "results.md").read_text())


PARTS = {"tests": part_tests, "convert": part_convert, "train": part_train, "cifar": part_cifar}


def run_part(name: str, out: Path, scratch: Path, dry_run: bool) -> None:
    """The child process of one part."""
    scratch = scratch / name
    scratch.mkdir(parents=True, exist_ok=True)
    report = Report(out, name, dry_run)
    report.update(status="running")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("cut off (SIGTERM)"))  # so that the parts' finally blocks run
    try:
        PARTS[name](report, DRY if dry_run else FULL, scratch, dry_run)
    except BaseException as error:
        report.update(status="failed", error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc())
        raise
    report.update(status="ok")


def run_limited(command: list[str], limit: float) -> str:
    """Run ``command`` in its own process group for at most ``limit`` seconds, then stop the whole group (the
    part's DataLoader workers and ``rela`` children too): SIGTERM, SIGKILL :data:`GRACE_S` seconds later.

    Returns:
        ``ok``, ``failed (exit status N)`` or ``cut off after N s``.
    """
    child = subprocess.Popen(command, start_new_session=True)
    try:
        code = child.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGTERM)  # the part records what finished; rela train saves a checkpoint
        try:
            child.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
        return f"cut off after {limit:.0f} s"
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)  # stragglers of a finished part
        except ProcessLookupError:
            pass
    return "ok" if code == 0 else f"failed (exit status {code})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of the gpu-<part>.json files")
    parser.add_argument("--dry-run", action="store_true", help="toy sizes on the CPU (what CI runs)")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()) / "rela-gpu-check",
                        help="folder of the parts' data and outputs")  # fmt: skip
    parser.add_argument("--budget", type=float, help="seconds for all parts together [480; --dry-run: 3000]")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    parser.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)  # the child process of one part
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part:
        run_part(args.part, args.out, args.scratch, args.dry_run)
        return 0
    sizes, started = (DRY if args.dry_run else FULL), time.perf_counter()
    budget = args.budget or (3000 if args.dry_run else 480)
    parts = args.parts.split(",")
    outcomes = {}
    for name in parts:
        left = budget - (time.perf_counter() - started) - MARGIN_S
        limit = min(left, sizes.limits[name] or left)
        if limit < 5:
            outcomes[name] = {"status": "not started: no time left"}
            continue
        print(f"== gpu check part {name} (at most {limit:.0f} s)", flush=True)
        command = [sys.executable, __file__, "--part", name, "--out", str(args.out), "--scratch", str(args.scratch)]
        part_started = time.perf_counter()
        status = run_limited(command + (["--dry-run"] if args.dry_run else []), limit)
        outcomes[name] = {"status": status, "seconds": time.perf_counter() - part_started}
        print(f"== {name}: {status}", flush=True)
    summary = {"dry_run": args.dry_run, "budget_s": budget, "sizes": asdict(sizes), "parts": outcomes}
    (args.out / "gpu-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    ran = sum(outcome["status"] == "ok" for outcome in outcomes.values())
    print(f"gpu check: {ran} of {len(parts)} parts ran")
    return 0 if ran == len(parts) else 1


if __name__ == "__main__":
    sys.exit(main())
