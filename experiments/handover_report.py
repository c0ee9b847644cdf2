"""One table and one curve for several ``rela study`` folders of the same setting (issue 26's hand-over studies).

Usage: ``python experiments/handover_report.py OUT STUDY [STUDY ...]``: reads each ``STUDY/results.json`` (runs
shared through links, such as the baseline, count once), writes ``OUT/handover.md`` (per arm and seed: final kNN,
the switch step, the online kNN monitor at the switch and one monitor interval later, the guarded rule's trials)
and ``OUT/curve.png`` (:func:`rela_train.study.plot_curves`: the monitor's kNN against images seen, switches and
rejected trials marked).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rela_train.study import arm_label, plot_curves


def monitor_readings(run: Path) -> dict[int, float]:
    """``{step: monitor kNN top-1}`` of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["monitor_knn_top1"] for record in records if "monitor_knn_top1" in record}


def switch_drop(record: dict) -> str:
    """``"a -> b"``: the monitor (%) at the switch (the last reading at or before it) and the next reading after."""
    if record["switch_step"] is None or record["run"] is None:
        return "-"
    readings = sorted(monitor_readings(Path(record["run"])).items())
    before = [value for step, value in readings if step <= record["switch_step"]][-1]
    after = [value for step, value in readings if step > record["switch_step"]]
    return f"{100 * before:.1f} -> {100 * after[0]:.1f} ({100 * (after[0] - before):+.1f})" if after else "-"


def trials(record: dict) -> str:
    """The guarded rule's trials: ``start-end: a -> b, kept|rolled back``."""
    return (
        "; ".join(
            f"{trial['start']}-{trial['end']}: {100 * trial['start_knn']:.1f} -> {100 * trial['end_knn']:.1f} "
            f"(ReLA's gain {100 * trial['rela_gain']:+.1f}), {'kept' if trial['kept'] else 'rolled back'}"
            for trial in record.get("trials", [])
        )
        or "-"
    )


def main(out: Path, studies: list[Path]) -> None:
    records, seen = [], set()
    for study in studies:
        for record in json.loads((study / "results.json").read_text())["records"]:
            key = str(Path(record["run"]).resolve()) if record["run"] else record["name"]
            if key not in seen:
                seen.add(key)
                records.append(record)
    lines = [
        "| arm | seed | kNN top-1 (%) | switch step | monitor at the switch -> one interval later | trials |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for record in records:
        lines.append(
            f"| {arm_label(record)} | {record['seed']} | {100 * record['knn_top1']:.2f} | "
            f"{record['switch_step'] if record['switch_step'] is not None else '-'} | {switch_drop(record)} | "
            f"{trials(record)} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "handover.md").write_text("\n".join(lines) + "\n")
    plot_curves(records, out / "curve.png")
    print("\n".join(lines))
    print(f"wrote {out / 'handover.md'} and {out / 'curve.png'}")


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit("usage: python experiments/handover_report.py OUT STUDY [STUDY ...]")
    main(Path(sys.argv[1]), [Path(argument) for argument in sys.argv[2:]])
