#!/usr/bin/env bash
# Gathers what the GPU check (benchmarks/gpu/run.sh) needs on a lent GPU machine into the ignored folder .gpu/,
# and prints the bytes that will travel (the working tree plus .gpu/ must stay under the device tool's 64 MiB):
#   .gpu/wheels/   the packages rela imports that the device image lacks (its list: the device tool's KINDS.md),
#                  at the versions of this environment, for --python-version (default 3.12, the device's), x86-64
#   .gpu/shared/   data/cifar10-jpeg.tar.gz (all of it: part 4 trains on the 50,000 images), the CIFAR ResNet-56
#                  prior (and ResNet-20, which the tests use), and data/imagenet-sample-<N>.tar: as many of the
#                  ImageNet sample's JPEGs as fit.
# Usage: bash benchmarks/gpu/prepare.sh [--python-version 3.12]   (needs the package index, not the GPU)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON_VERSION=3.12
if [[ ${1:-} == --python-version ]]; then PYTHON_VERSION=$2; fi
PYTHON=${PYTHON:-.venv/bin/python}
SHARED=${RELA_SHARED:-../shared}
#: What may travel (the device tool's limit), and what is kept free for the files of a session's own changes.
LIMIT=$((64 * 1024 * 1024)) MARGIN=$((3 * 1024 * 1024))
#: Imported by rela, absent from the device image (KINDS.md: torch, torchvision, numpy, h5py, click, tqdm,
#: pillow, matplotlib, tensorboard, pytorch-lightning, pyyaml, pytest... are there).
PACKAGES=(webdataset braceexpand lightly kornia kornia_rs faiss-cpu)

rm -rf .gpu.tmp
mkdir -p .gpu.tmp/wheels .gpu.tmp/shared/data .gpu.tmp/shared/models/cifar10-resnet
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    PLATFORMS+=(--platform "$platform")
done
for package in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m; print(m.version('$package'))")
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp "${PLATFORMS[@]}" -d .gpu.tmp/wheels "$package==$version" >>.gpu.tmp/pip.log 2>&1 \
        || { cat .gpu.tmp/pip.log; echo "prepare: no wheel of $package==$version for Python $PYTHON_VERSION"; exit 1; }
done
rm .gpu.tmp/pip.log
cp "$SHARED/data/cifar10-jpeg.tar.gz" .gpu.tmp/shared/data/
cp "$SHARED"/models/cifar10-resnet/resnet{20-12fca82f,56-4bfd9763}.th .gpu.tmp/shared/models/cifar10-resnet/
"$PYTHON" - "$SHARED/data/imagenet-sample-500.tar" "$LIMIT" "$MARGIN" <<'PY'
"""Fill what is left under the limit with ImageNet JPEGs, then print what travels."""
import subprocess
import sys
import tarfile
from pathlib import Path

source, limit, margin = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True)
tree = sum(Path(name).stat().st_size for name in listed.stdout.decode().split("\0") if name and Path(name).is_file())
carried = {path: path.stat().st_size for path in Path(".gpu.tmp").rglob("*") if path.is_file()}
room = limit - margin - tree - sum(carried.values()) - 64 * 1024  # the tar's own headers and end blocks
chosen, size = [], 0
with tarfile.open(source) as archive:
    members = sorted((m for m in archive.getmembers() if m.isfile()), key=lambda m: m.name)
    for member in members:
        if size + member.size + 512 > room:
            break
        chosen.append(member)
        size += member.size + 512
    target = Path(f".gpu.tmp/shared/data/imagenet-sample-{len(chosen)}.tar")
    with tarfile.open(target, "w") as subset:
        for member in chosen:
            subset.addfile(member, archive.extractfile(member))
wheels = sum(size for path, size in carried.items() if path.suffix == ".whl")
data = sum(path.stat().st_size for path in Path(".gpu.tmp/shared").rglob("*") if path.is_file())
total = tree + wheels + data
print(f"prepare: working tree {tree / 2**20:.1f} MiB, wheels {wheels / 2**20:.1f} MiB, data {data / 2**20:.1f} MiB "
      f"(CIFAR-10, CIFAR ResNet-20 and -56, {len(chosen)} of {len(members)} ImageNet JPEGs)")
print(f"prepare: {total / 2**20:.1f} MiB will travel (limit {limit / 2**20:.0f} MiB)")
if total > limit:
    sys.exit("prepare: over the device tool's limit")
PY
rm -rf .gpu && mv .gpu.tmp .gpu
echo "prepare: ready in .gpu/; run on the device: bash benchmarks/gpu/run.sh (carry .gpu)"
