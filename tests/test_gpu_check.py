"""The GPU check cannot rot between loans (issue 20): ``benchmarks/gpu/run.sh --dry-run`` runs its four parts
(CUDA tests, conversion rate, training rate, the CIFAR-10 study) at toy sizes on the CPU, on real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import PROJECT

PARTS = ("tests", "convert", "train", "cifar")


def test_the_dry_run_runs_every_part_and_reports_figures(tmp_path):
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    command = ["bash", "benchmarks/gpu/run.sh", "--dry-run", "--scratch", str(tmp_path / "scratch")]
    result = subprocess.run(command, cwd=PROJECT, env=environment, capture_output=True, text=True, timeout=3000)
    assert result.stdout.strip().splitlines()[-1] == "gpu check: 4 of 4 parts ran", result.stdout[-5000:]
    assert result.returncode == 0
    assert (out / "gpu-log.txt").read_text().strip().endswith("gpu check: 4 of 4 parts ran")
    reports = {part: json.loads((out / f"gpu-{part}.json").read_text()) for part in PARTS}
    assert all(report["status"] == "ok" and report["dry_run"] for report in reports.values())
    tests = reports["tests"]
    assert tests["tests"] == 5 and tests["failures"] == tests["errors"] == tests["skipped"] == 0
    convert = reports["convert"]
    for decode in ("cpu", "device"):
        assert min(convert["convert"][decode]["images_per_s"].values()) > 0
        assert (convert["convert"][decode]["marginal_images_per_s"] or 1) > 0  # None: noise at toy sizes
    assert convert["alone_images_per_s"]["cpu_decode"] > 0 and convert["alone_images_per_s"]["prior"] > 0
    train = reports["train"]
    assert set(train["views_images_per_s"]) == {"cpu", "device"} and min(train["views_images_per_s"].values()) > 0
    assert train["synthetic_images_per_s"]["rela"] > 0 and train["rela_over_byol_step_rate"] > 0
    records = reports["cifar"]["records"]
    assert {record["name"].split("-")[1] for record in records} >= {"baseline", "rela", "untrained"}
    assert all(0 <= record["knn_top1"] <= 1 for record in records)
    assert [run["summary"]["steps"] > 0 for run in reports["cifar"]["finished_runs"]] == [True, True]
    summary = json.loads((out / "gpu-summary.json").read_text())
    assert [summary["parts"][part]["status"] for part in PARTS] == ["ok"] * 4
