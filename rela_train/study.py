"""``rela study``: does ReLA pay off on this data? The baseline against ReLA at smaller budgets.

For every seed the study trains the baseline (the method alone, ``--rela off``, data ratio 1.0) and
ReLA at each data ratio ``r`` (``r`` of the baseline's images: the paper's budget, method.md stage
1 step 3), optionally for several switch rules (``--rules``, e.g. the default rule beside ReLA alone,
``static:1``, and the method alone at the same budget, ``off``), subset strategies and transfer heads,
all with the same other options. Each run is a normal ``rela train`` RUN folder under ``OUT/runs/`` and is
evaluated once (kNN, optionally a linear probe) into ``RUN/eval.json``, so a killed study resumes where it stopped.
The ``untrained`` row evaluates each seed's network before any step. Outputs: ``OUT/results.json``
(one record per run), ``OUT/results.md`` (table and verdict) and ``OUT/curve.png`` (online kNN
against images seen, from the ``--monitor-*`` records in each run's metrics.jsonl).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from rela_convert.backbones import build_backbone, initial_backbone
from rela_convert.checkpoint import load_backbone
from rela_convert.dataset.converted import ConvertedDataset
from rela_convert.dataset.files import write_atomic, write_json_atomic
from rela_convert.dataset.subset import subset_size
from rela_convert.devices import resolve_device
from rela_train.config import TrainConfig
from rela_train.evaluate import evaluate
from rela_train.methods import METHODS, MethodSettings
from rela_train.rela import parse_rela
from rela_train.setup import resolve_config
from rela_train.trainer import Trainer

#: The baseline must end at least this many points of kNN top-1 above the untrained network, or the
#: study measured nothing (results.md then says so).
MIN_LEARNING_POINTS = 5.0


@dataclass(frozen=True)
class StudyOptions:
    """What a study compares (see ``rela study --help``).

    Attributes:
        ratios: data ratios of the ReLA arms, each in (0, 1].
        rules: the ReLA arms' switch rules (:func:`rela_train.rela.parse_rela`); empty: the config's ``rela``.
            ``off`` trains the method alone at each ratio below 1 (at 1 it is the baseline).
        seeds: training seeds; every arm runs once per seed.
        subsets: subset strategies of the ReLA arms (``random`` first: the paper's rule).
        transfer_heads: transfer heads of the ReLA arms (:data:`rela_train.rela.TRANSFER_HEADS`).
        probe_epochs: linear-probe epochs of the final evaluation (0: kNN only).
        eval_workers: DataLoader workers of the final evaluation.
    """

    ratios: tuple[float, ...] = (0.1, 0.2, 0.5)
    rules: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0, 1)
    subsets: tuple[str, ...] = ("random",)
    transfer_heads: tuple[str, ...] = ("fixed",)
    probe_epochs: int = 0
    eval_workers: int = 2


@dataclass(frozen=True)
class Arm:
    """One training run of the study: a name (its RUN folder under ``OUT/runs``) and its config."""

    name: str
    config: TrainConfig

    @property
    def record(self) -> dict:
        """The arm's identifying fields in results.json."""
        config = self.config
        return {
            "name": self.name,
            "seed": config.seed,
            "ratio": config.data_ratio,
            "rela": config.rela,
            "subset": config.subset,
            "transfer_head": config.transfer_head,
            "handover": config.handover,
            "handover_ramp": config.handover_ramp,
        }


def _rule_slug(rule: str) -> str:
    """A rule as it appears in a run's folder name: ``static:0.5`` -> ``static0.5``."""
    return rule.replace(":", "")


def study_arms(config: TrainConfig, options: StudyOptions) -> list[Arm]:
    """The runs of a study, in the order they train: per seed, the baseline, then at each ratio
    each rule for each subset strategy and transfer head. The first rule's arms are named
    ``seed<s>-rela-r<ratio>``, the others' ``seed<s>-<rule>-r<ratio>`` (``static:1`` -> ``static1``).

    Args:
        config: shared training options; its ``rela`` is the ReLA arms' rule unless ``options.rules`` names them.

    Raises:
        ValueError: a misspelt rule, only ``off``, or a ratio outside (0, 1].
    """
    rules = options.rules or (config.rela,)
    for rule in rules:
        parse_rela(rule)  # a misspelt rule fails now, not after the baseline has trained
    if set(rules) == {"off"}:
        raise ValueError("--rela off leaves nothing to compare: the study's ReLA arms need a rule that trains ReLA")
    if any(not 0 < ratio <= 1 for ratio in options.ratios):
        raise ValueError(f"--ratios must lie in (0, 1], got {options.ratios}")
    arms = []
    for seed in options.seeds:
        base = replace(config, seed=seed)
        arms.append(
            Arm(
                f"seed{seed}-baseline",
                replace(base, rela="off", data_ratio=1.0, subset="random", transfer_head="fixed"),
            )
        )
        for ratio in options.ratios:
            for rule in rules:
                if rule == "off" and ratio == 1:
                    continue  # the baseline
                prefix = "rela" if rule == rules[0] else _rule_slug(rule)
                for subset in options.subsets:
                    for head in options.transfer_heads:
                        suffix = ("" if subset == "random" else f"-{subset}") + ("" if head == "fixed" else f"-{head}W")
                        arms.append(
                            Arm(
                                f"seed{seed}-{prefix}-r{ratio:g}{suffix}",
                                replace(base, rela=rule, data_ratio=ratio, subset=subset, transfer_head=head),
                            )
                        )
    return arms


def synthetic_images_per_s(config: TrainConfig, device: torch.device, num_classes: int, steps: int = 2) -> float:
    """Training images/s of the method's own step with its bookkeeping (the costlier phase: BYOL
    runs the momentum network too) on random batches at the training size, after one warm-up step;
    data loading excluded. Used for the study's time estimate and ``benchmarks/methods.py``.

    Args:
        config: a resolved config (``input_size`` and ``stem`` set).
        num_classes: classes of the data (the ``supervised`` method's classifier; labels are all 0).
    """
    with torch.random.fork_rng(devices=[]):
        backbone, feature_dim = build_backbone(config.arch, config.input_size, config.stem)
        settings = MethodSettings(feature_dim, config.input_size, num_classes, config.momentum, total_steps=steps + 1)
        method = METHODS.get(config.method)(backbone, settings).to(device)
        optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=config.lr)
        images = torch.randn(config.batch_size, 3, config.input_size, config.input_size, device=device)
        labels = torch.zeros(config.batch_size, dtype=torch.int64, device=device)
        for step in range(steps + 1):
            if step == 1:
                started = time.perf_counter()
            loss = method.loss(images, images, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            method.after_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return steps * config.batch_size / (time.perf_counter() - started)


def _switch_marks(record: dict, curve: list[tuple[int, float]]) -> tuple[list, list]:
    """``(switches, rejected trials)`` of a run as ``(images_seen, monitor kNN)`` points on its ``curve``: the
    switch to the method (``switch_step``) and the start of each rejected trial, at the monitor's reading of
    that step (or the last one before it)."""
    if not curve or not record["images_seen"]:
        return [], []
    per_step = record["images_seen"] / max(_steps(record), 1)

    def point(step: int) -> tuple[int, float]:
        before = [item for item in curve if item[0] <= step * per_step]
        return before[-1] if before else curve[0]

    switches = [point(record["switch_step"])] if record["switch_step"] is not None else []
    return switches, [point(trial["start"]) for trial in record.get("trials", []) if not trial["kept"]]


def _steps(record: dict) -> int:
    """Optimiser steps of a record's run (from its summary.json)."""
    return json.loads((Path(record["run"]) / "summary.json").read_text())["steps"]


def _monitor_curve(run: Path) -> list[tuple[int, float]]:
    """``(images_seen, monitor kNN top-1)`` pairs of a run's metrics.jsonl, in step order."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [(record["images_seen"], record["monitor_knn_top1"]) for record in records if "monitor_knn_top1" in record]


def run_study(
    data: str | Path,
    out: str | Path,
    train_dir: str | Path,
    test_dir: str | Path,
    config: TrainConfig,
    options: StudyOptions,
    echo=print,
) -> list[dict]:
    """Train and evaluate every arm (resuming finished ones), then write the report.

    Args:
        data: converted dataset folder.
        out: study folder (created).
        train_dir, test_dir: labelled class-folder trees of the final kNN / probe evaluation.
        config: shared training options (see :func:`study_arms`).
        options: :class:`StudyOptions`.
        echo: where the progress lines go (one line per run, and the estimate at the start).

    Returns:
        The records of ``OUT/results.json``: per run ``name``, ``seed``, ``ratio``, ``rela``,
        ``subset``, ``transfer_head``, ``knn_top1`` (fraction), ``linear_top1`` and
        ``linear_top1_std`` with a probe, ``images_seen``, ``seconds`` (training time over every ``fit``
        call of the run), ``switch_step``, ``trials`` (``--rela guarded``'s trial records, else empty), ``run``;
        plus one ``rela: "untrained"`` record per seed (``ratio`` 0, no run).

    Raises:
        DatasetError, TrainingError, ValueError: as ``rela train`` and ``rela eval``.
    """
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    arms = study_arms(config, options)
    dataset = ConvertedDataset(data, config.storage)
    resolved = replace(  # the baseline's, with the arms' rule and hand-over
        resolve_config(arms[0].config, dataset),
        rela=config.rela,
        handover=config.handover,
        handover_ramp=config.handover_ramp,
    )
    device, num_samples = resolve_device(resolved.device), dataset.num_samples
    step_images = resolved.batch_size * int(os.environ.get("WORLD_SIZE", "1"))
    images = sum(
        arm.config.epochs * (subset_size(num_samples, arm.config.data_ratio) // step_images) * step_images
        for arm in arms
    )
    rate = synthetic_images_per_s(resolved, device, len(dataset.index.classes))
    echo(
        f"study: {len(arms)} runs ({len(options.seeds)} seeds x "
        f"(baseline + {len(arms) // len(options.seeds) - 1} ReLA arms)), "
        f"{images:,} training images in all, {resolved.arch} at {resolved.input_size} px ({resolved.stem} stem); "
        f"estimated at most {images / rate / 60:.0f} min of training at {rate:.0f} images/s "
        f"(the method's step on synthetic batches; ReLA steps are cheaper), plus evaluation"
    )
    records, started = [], time.perf_counter()
    for number, arm in enumerate(arms, start=1):
        run = out / "runs" / arm.name
        summary = Trainer(data, run, arm.config).fit(progress=False)
        evaluation = _evaluate_once(
            run / "eval.json", lambda: load_backbone(run), train_dir, test_dir, options, resolved.device
        )
        record = {
            **arm.record,
            **_accuracies(evaluation),
            "images_seen": summary["images_seen"],
            "seconds": summary["seconds"],
            "switch_step": summary["switch_step"],
            "trials": summary.get("trials", []),
            "run": str(run),
        }
        records.append(record)
        switch = f", switched at step {record['switch_step']}" if record["switch_step"] else ""
        echo(
            f"[{number}/{len(arms)}] {arm.name}: kNN top-1 {100 * record['knn_top1']:.2f}%, "
            f"{record['images_seen']:,} images, "
            f"{record['seconds']:.0f} s{switch}{' (already done)' if summary.get('already_done') else ''}; "
            f"study time so far {(time.perf_counter() - started) / 60:.1f} min"
        )
    for seed in options.seeds:
        records.append(_untrained(out, resolved, seed, train_dir, test_dir, options))
    write_json_atomic(
        out / "results.json", {"records": records, "config": asdict(resolved), "options": asdict(options)}
    )
    write_atomic(out / "results.md", report(records, resolved, options).encode())
    plot_curves(records, out / "curve.png")
    echo(f"wrote {out / 'results.md'}, {out / 'results.json'} and {out / 'curve.png'}")
    return records


def _evaluate_once(
    path: Path,
    backbone: Callable[[], tuple[nn.Module, int]],
    train_dir: str | Path,
    test_dir: str | Path,
    options: StudyOptions,
    device: str,
) -> dict:
    """:func:`rela_train.evaluate.evaluate` of ``backbone()`` (a ``(network, input size)`` pair), computed
    once and kept in ``path`` (JSON), so a resumed study does not evaluate again."""
    if not path.is_file():
        network, input_size = backbone()
        evaluation = evaluate(
            network,
            input_size,
            train_dir,
            test_dir,
            probe_epochs=options.probe_epochs,
            workers=options.eval_workers,
            device=device,
            progress=False,
        )
        write_json_atomic(path, evaluation)
    return json.loads(path.read_text())


def _accuracies(evaluation: dict) -> dict:
    """The accuracy fields of an evaluation (``knn_top1``; ``linear_top1``, ``linear_top1_std`` with a probe)."""
    return {key: evaluation[key] for key in ("knn_top1", "linear_top1", "linear_top1_std") if key in evaluation}


def _untrained(
    out: Path, config: TrainConfig, seed: int, train_dir: str | Path, test_dir: str | Path, options: StudyOptions
) -> dict:
    """The ``untrained`` record of one seed: the network exactly as training initialises it."""
    evaluation = _evaluate_once(
        out / f"untrained-seed{seed}.json",
        lambda: (initial_backbone(config.arch, config.input_size, config.stem, seed)[0], config.input_size),
        train_dir,
        test_dir,
        options,
        config.device,
    )
    return {
        "name": f"seed{seed}-untrained",
        "seed": seed,
        "ratio": 0.0,
        "rela": "untrained",
        "subset": None,
        "transfer_head": None,
        **_accuracies(evaluation),
        "images_seen": 0,
        "seconds": 0.0,
        "switch_step": None,
        "trials": [],
        "run": None,
    }


def _extras(record: dict) -> str:
    """``", <subset>, <head> W, <handover> heads, ramp <n>"`` for a ReLA arm's subset strategy, transfer head and
    hand-over when not the defaults (records written before the hand-over options have neither)."""
    extras = [record["subset"]] if record["subset"] not in (None, "random") else []
    extras += [f"{record['transfer_head']} W"] if record["transfer_head"] not in (None, "fixed") else []
    if record["rela"] not in ("off", "untrained"):
        extras += ["cold heads"] if record.get("handover") == "reference" else []
        extras += [f"ramp {record['handover_ramp']}"] if record.get("handover_ramp") else []
    return "".join(f", {extra}" for extra in extras)


def _arm_name(record: dict) -> str:
    """``untrained``, ``baseline (method alone)``, ``method alone`` (``off`` below ratio 1) or ``ReLA (<rule>)``,
    plus :func:`_extras`."""
    if record["rela"] == "untrained":
        return "untrained"
    if record["rela"] == "off":
        return "baseline (method alone)" if record["ratio"] == 1 else "method alone"
    return f"ReLA ({record['rela']}){_extras(record)}"


def arm_label(record: dict) -> str:
    """A curve's legend: :func:`_arm_name` and, below ratio 1, the ratio."""
    return _arm_name(record) + (f" r={record['ratio']:g}" if 0 < record["ratio"] < 1 else "")


def _arm_key(record: dict) -> tuple:
    return (record["rela"], record["ratio"], record["subset"], record["transfer_head"], _extras(record))


def report(records: list[dict], config: TrainConfig, options: StudyOptions) -> str:
    """results.md: one table row per arm (mean and per-seed accuracy, images seen, time, switch
    steps), the verdict per ReLA arm and seed, and a warning when the baseline did not learn."""
    by_arm: dict[tuple, list[dict]] = {}
    for record in records:
        by_arm.setdefault(_arm_key(record), []).append(record)
    probe = any("linear_top1" in record for record in records)
    lines = [
        "# rela study",
        "",
        f"{config.arch} ({config.stem} stem) at {config.input_size} px, {config.method}, {config.epochs} epochs, "
        f"batch {config.batch_size}, lr {config.lr} ({config.lr_schedule}), ReLA rules "
        f"{', '.join(f'`{rule}`' for rule in options.rules or (config.rela,))}, hand-over `{config.handover}`; "
        f"seeds {', '.join(map(str, options.seeds))}. "
        "Accuracy: kNN top-1 (k=200, T=0.1) in %"
        + (", linear probe (mean of the last 3 epochs)" if probe else "")
        + ".",
        "",
        "| arm | data ratio | kNN mean | kNN per seed |"
        + (" probe mean |" if probe else "")
        + " images seen | time (s) | switch step |",
        "|---|---|---|---|" + ("---|" if probe else "") + "---|---|---|",
    ]
    for key, group in by_arm.items():
        ratio = key[1]
        name = _arm_name(group[0])
        knn = [100 * record["knn_top1"] for record in group]
        cells = [name, f"{ratio:g}", f"{np.mean(knn):.2f}", " / ".join(f"{value:.2f}" for value in knn)]
        if probe:
            cells.append(f"{100 * np.mean([record.get('linear_top1', np.nan) for record in group]):.2f}")
        switches = [str(record["switch_step"]) for record in group if record["switch_step"] is not None]
        cells += [
            f"{int(np.mean([record['images_seen'] for record in group])):,}",
            f"{np.mean([record['seconds'] for record in group]):.0f}",
            ", ".join(switches) or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    baseline = {record["seed"]: record["knn_top1"] for record in records if record["rela"] == "off"}
    untrained = {record["seed"]: record["knn_top1"] for record in records if record["rela"] == "untrained"}
    lines += ["", "## Verdict", ""]
    for key, group in by_arm.items():
        if key[0] in ("off", "untrained"):
            continue
        verdicts = ", ".join(
            f"seed {record['seed']} {'yes' if record['knn_top1'] >= baseline[record['seed']] else 'no'}"
            for record in group
        )
        lines.append(f"- {_arm_name(group[0])} at {key[1]:g} matches or beats the baseline at 100%: {verdicts}")
    gaps = {seed: 100 * (baseline[seed] - untrained[seed]) for seed in baseline if seed in untrained}
    if gaps and min(gaps.values()) < MIN_LEARNING_POINTS:
        seed = min(gaps, key=gaps.get)
        lines += [
            "",
            f"**Warning:** the baseline ends {gaps[seed]:+.1f} points of kNN top-1 from the untrained network (seed "
            f"{seed}; fewer than {MIN_LEARNING_POINTS:g} above): it has barely started learning, so this comparison "
            "measures little. Train longer, with smaller batches or a cheaper network.",
        ]
    return "\n".join(lines) + "\n"


def plot_curves(records: list[dict], path: Path) -> None:
    """curve.png: kNN top-1 against training images seen for every run. With ``--monitor-*`` the
    online kNN curves from each run's metrics.jsonl (each starts at step 0: the untrained network
    on the monitor folders), each switch to the method marked by a cross and each rejected trial of
    ``--rela guarded`` by an open circle at its start; without, the final kNN of each run as a point
    and the untrained level as a dotted line (different folders, so the two are never mixed in one plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    arms = sorted(
        {arm_label(record) for record in records if record["rela"] not in ("off", "untrained") or record["ratio"] < 1}
    )
    palette = plt.cm.tab10.colors if len(arms) <= 10 else plt.cm.viridis(np.linspace(0.1, 0.9, len(arms)))
    colours = dict(zip(arms, palette))
    styles = ["-", "--", ":", "-."]
    seeds = sorted({record["seed"] for record in records})
    trained = [record for record in records if record["rela"] != "untrained"]
    curves = {record["run"]: _monitor_curve(Path(record["run"])) for record in trained}  # names repeat across studies
    monitored = any(curves.values())
    for record in records if not monitored else trained:
        style = styles[seeds.index(record["seed"]) % len(styles)]
        label = f"{arm_label(record)} (seed {record['seed']})"
        if record["rela"] == "untrained":
            axes.axhline(100 * record["knn_top1"], color="grey", linestyle=":", linewidth=1, label=label)
        elif monitored:
            seen, accuracy = zip(*curves[record["run"]]) if curves[record["run"]] else ((), ())
            colour = colours.get(arm_label(record), "black")
            axes.plot(seen, [100 * value for value in accuracy], style, color=colour, label=label)
            for marker, points in zip(("x", "o"), _switch_marks(record, curves[record["run"]])):
                if points:
                    x, y = zip(*points)
                    axes.plot(x, [100 * value for value in y], marker, color=colour, fillstyle="none", markersize=9)
        else:
            colour = colours.get(arm_label(record), "black")
            axes.plot([record["images_seen"]], [100 * record["knn_top1"]], "o", color=colour, label=label)
    axes.set_xlabel("training images seen")
    axes.set_ylabel("online kNN top-1 on the monitor folders (%)" if monitored else "kNN top-1 (%)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)
