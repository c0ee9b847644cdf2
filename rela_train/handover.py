"""The hand-over from ReLA to the method: when to make it (the guarded rule) and how (cold or warm).

The reference (LINs-lab/ReLA; method.md, stage 2) switches for good once the ReLA loss plateaus
(:class:`rela_train.rela.AdaptiveSwitch`), with the method's heads untouched until then and the
learning rate unchanged. Measured here (docs/handover.md, docs/studies.md), that switch throws away ReLA's
lead at every budget this project has reached: the online kNN falls 13 to 14 points within one
monitor interval and the run ends below ReLA left on. A plateau of the ReLA loss says that ReLA
stops improving, not that the method will do better from there. This module is our addition
(not in the paper or the reference code):

- **When** (``--rela guarded``, :class:`GuardedSwitch`): the reference's plateau rule only proposes
  a hand-over. The trainer then tries the method for one monitor interval (a *trial*) from a copy
  of the model and optimiser, and keeps the method only if the online kNN monitor gained at least
  as much over the trial as it did under ReLA over the interval before it (and did not fall), less
  the monitor's noise: its standard error at 50% accuracy, ``0.5 / sqrt(test images)`` (2.2 points
  for 500 images), so that a difference the monitor cannot resolve does not decide;
  otherwise it restores the copy and goes on with ReLA, and proposes again after a back-off that
  doubles with every rejected trial. ``--rela guarded:<c>`` also proposes from epoch
  ``int(c * epochs)`` on, whatever the plateau rule says (the guarded counterpart of ``static:<c>``).
  The evidence is the online kNN monitor (``--monitor-*``): without labelled monitor folders there
  is none, and the guarded rule never hands over.
- **How** (``--handover``, :data:`HANDOVERS`): ``reference`` (the method's heads first see a gradient
  at the switch) or ``warm`` (while ReLA trains the backbone, the method's heads are fitted by the
  method's own loss on the backbone's *detached* features of the ReLA views, as an online linear
  probe is, so the backbone's updates are exactly those of ReLA alone and no extra backbone pass is
  made; methods with a momentum backbone use the online features in its place, see
  :meth:`rela_train.methods.Method.head_loss`). ``--handover-ramp N`` also raises the learning
  rate linearly from 0 over the first ``N`` steps of the method (:func:`handover_lr_factor`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: ``--handover``: ``reference`` (cold heads, the reference) or ``warm`` (heads fitted on detached features
#: during ReLA).
HANDOVERS = ("reference", "warm")

#: After the n-th rejected trial the next one waits at least ``BACKOFF_INTERVALS * 2 ** (n - 1)`` monitor
#: intervals, so rejected trials cost at most about 1 / (1 + BACKOFF_INTERVALS) of the steps that follow.
BACKOFF_INTERVALS = 4


def handover_lr_factor(step: int, switch_step: int | None, ramp_steps: int) -> float:
    """The learning-rate factor of step ``step`` (0-based) with ``--handover-ramp ramp_steps``: ``(step -
    switch_step + 1) / ramp_steps`` for the first ``ramp_steps`` steps of the method after the switch at
    ``switch_step``, else 1 (also before any switch, and with ``ramp_steps`` 0)."""
    if not ramp_steps or switch_step is None or step < switch_step:
        return 1.0
    return min(1.0, (step - switch_step + 1) / ramp_steps)


@dataclass
class GuardedSwitch:
    """State of ``--rela guarded``: ReLA, a trial of the method, or the method for good.

    The trainer calls :meth:`decide` on rank 0 with every online kNN reading (fraction in [0, 1]) and
    whether the reference's plateau rule has fired; every rank then calls :meth:`apply` with the same
    action, so all ranks change phase at the same step.

    Attributes:
        phase: ``rela``, ``trial`` or ``method``.
        interval: steps between two monitor readings (``--monitor-every``), the length of a trial.
        tolerance: the monitor's noise, a fraction: a trial is kept when its gain reaches ReLA's less this.
        trial_start: the step at which the current (or last) trial began.
        start_accuracy: the monitor's kNN at ``trial_start``.
        rela_gain: the monitor's gain under ReLA over the interval before ``trial_start``.
        previous: the last reading under ReLA as ``[step, accuracy]`` (None: none yet).
        next_trial: the earliest step at which a trial may begin.
        trials: one record per trial ended: ``start``, ``end`` (steps), ``start_knn``, ``end_knn``,
            ``rela_gain``, ``kept``.
    """

    interval: int = 0
    tolerance: float = 0.0
    phase: str = "rela"
    trial_start: int | None = None
    start_accuracy: float = 0.0
    rela_gain: float = 0.0
    previous: list | None = None
    next_trial: int = 0
    trials: list = field(default_factory=list)

    @property
    def rela_active(self) -> bool:
        """Whether the next step optimises the ReLA loss."""
        return self.phase == "rela"

    def decide(self, step: int, accuracy: float, plateau: bool, last: bool = False) -> str | None:
        """Rank 0: the action for the monitor reading ``accuracy`` taken after step ``step``: ``"start"`` (a
        trial of the method from here), ``"keep"`` (the trial gained at least ReLA's recent gain, pro rata of
        its length, and at least 0, less :attr:`tolerance`: the method for good), ``"rollback"`` (back to the
        copy taken at the trial's start) or None. ``plateau``: the reference's rule has fired; ``last``: the run
        ends after this step (a trial still running is judged now; no trial starts)."""
        if self.phase == "trial" and (last or step - self.trial_start >= self.interval):
            expected = max(self.rela_gain, 0.0) * (step - self.trial_start) / self.interval
            kept = accuracy - self.start_accuracy >= expected - self.tolerance
            self.trials.append(
                {
                    "start": self.trial_start,
                    "end": step,
                    "start_knn": self.start_accuracy,
                    "end_knn": accuracy,
                    "rela_gain": self.rela_gain,
                    "kept": kept,
                }
            )
            if kept:
                return "keep"
            rejected = sum(not trial["kept"] for trial in self.trials)
            self.next_trial = step + self.interval * BACKOFF_INTERVALS * 2 ** (rejected - 1)
            self.previous = [step, self.start_accuracy]  # the model is put back as it was at the trial's start
            return "rollback"
        if self.phase != "rela":
            return None
        previous, self.previous = self.previous, [step, accuracy]
        if last or not plateau or previous is None or step < self.next_trial:
            return None
        self.trial_start, self.start_accuracy = step, accuracy
        self.rela_gain = (accuracy - previous[1]) * self.interval / max(step - previous[0], 1)
        return "start"

    def apply(self, action: str | None, step: int) -> None:
        """Every rank: change phase for ``action`` (see :meth:`decide`) taken after step ``step``.

        Raises:
            ValueError: an unknown action.
        """
        if action is None:
            return
        phases = {"start": "trial", "keep": "method", "rollback": "rela"}
        if action not in phases:
            raise ValueError(f"unknown hand-over action {action!r}")
        self.phase = phases[action]
        if action == "start":
            self.trial_start = step
