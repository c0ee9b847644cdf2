"""The phases of a run: which loss each step optimises, ReLA's until the hand-over, then the method's.

While ReLA is active the optimiser sees only the ReLA loss (lambda = 1) for the backbone and the method's
bookkeeping (BYOL's momentum update) still runs every step; once the ReLA loss plateaus (``--rela adaptive``) or
after ``c * epochs`` epochs (``static:<c>``) training continues with the method's own loss and views for good
(method.md, stage 2; Sun, Jiang, Lin, NeurIPS 2024, Sec. 4.2). ``--rela guarded`` (our default,
:mod:`rela_train.handover`) only tries the method when the plateau rule proposes it and keeps it on the online kNN
monitor's evidence: :meth:`Phases.guard` copies the model and optimiser at a trial's start and restores them when
the trial is rejected. ``--rela off`` runs the method alone.
"""

from __future__ import annotations

import logging
import math

import torch

from rela_convert.distributed import Ranks
from rela_train.data.stream import TrainStream
from rela_train.handover import GuardedSwitch
from rela_train.rela import StaticSwitch, parse_rela
from rela_train.run_state import TrainingState

LOGGER = logging.getLogger(__name__)

#: The actions of :meth:`Phases.guard`, in the order they are reduced over ranks (an index each).
GUARD_ACTIONS = (None, "start", "keep", "rollback")


def _cpu_copy(value):
    """A copy of a (nested) state dict with every tensor copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu_copy(item) for item in value)
    return value


class Phases:
    """The switch rule of a run (``--rela``) applied to its training state.

    Args:
        rule: the ``--rela`` spelling (:func:`rela_train.rela.parse_rela`).
        epochs: the run's epochs (``static:<c>`` and ``guarded:<c>`` count from them).

    Attributes:
        mode: ``off``, ``static``, ``adaptive`` or ``guarded``; static_fraction: ``c`` of ``static:<c>`` /
            ``guarded:<c>``.

    Raises:
        ValueError: a misspelt rule.
    """

    def __init__(self, rule: str, epochs: int) -> None:
        self.mode, self.static_fraction = parse_rela(rule)
        self.epochs = epochs

    @property
    def plateau_rule(self) -> bool:
        """Whether the ReLA loss's plateau (:class:`rela_train.rela.AdaptiveSwitch`) decides or proposes the
        switch (``adaptive``, ``guarded``)."""
        return self.mode in ("adaptive", "guarded")

    def guarded_switch(self, monitor_every: int, test_images: int, is_main: bool) -> GuardedSwitch | None:
        """The guarded rule's state for a run monitored every ``monitor_every`` steps on ``test_images`` labelled
        images (None under the other rules): a trial's verdict tolerates the monitor's standard error at 50%
        accuracy, ``0.5 / sqrt(test_images)``."""
        if self.mode != "guarded":
            return None
        if not monitor_every and is_main:
            LOGGER.warning(
                "--rela guarded hands over to the method only on the online kNN monitor's evidence; without "
                "--monitor-train, --monitor-test and --monitor-every there is none, so ReLA trains to the end"
            )
        tolerance = 0.5 / math.sqrt(test_images) if test_images else 0.0
        return GuardedSwitch(interval=monitor_every, tolerance=tolerance)

    def rela_active(self, state: TrainingState) -> bool:
        """Whether the next step optimises the ReLA loss."""
        if self.mode == "off":
            return False
        if self.mode == "static":
            return not StaticSwitch(self.static_fraction, self.epochs).update(state.epoch)
        if self.mode == "guarded":
            return state.guard.rela_active
        return not state.switch.switched

    def note_switch(self, state: TrainingState, was_rela: bool, stream: TrainStream) -> bool:
        """Record the step at which ReLA ended (or, when a guarded trial is rolled back, that it has not) and give
        the stream the views of the phase that follows; returns whether the phase changed at this step."""
        rela = self.rela_active(state)
        if was_rela == rela:
            return False
        state.switch_step = None if rela else state.step
        stream.set_phase(rela=rela)
        return True

    def guard(self, state: TrainingState, accuracy: float | None, ranks: Ranks, last: bool = False) -> str | None:
        """``--rela guarded[:<c>]``: rank 0 decides on the monitor's reading ``accuracy``
        (:meth:`rela_train.handover.GuardedSwitch.decide`; a hand-over is proposed once the plateau rule has fired
        or, with ``:<c>``, from epoch ``int(c * epochs)`` on), every rank applies the decision: at a trial's start
        the model and optimiser are copied, at its rejection they are restored from that copy. ``last``: the run
        ends after this step. Returns the action (one of :data:`GUARD_ACTIONS`)."""
        guard = state.guard
        code = 0.0
        if ranks.rank == 0 and accuracy is not None:
            due = StaticSwitch(self.static_fraction, self.epochs).update(state.epoch)  # --rela guarded:<c>
            proposed = state.switch.switched or due
            code = float(GUARD_ACTIONS.index(guard.decide(state.step, accuracy, proposed, last)))
        if ranks.world > 1:
            (code,) = ranks.reduce([code])
        action = GUARD_ACTIONS[int(code)]
        guard.apply(action, state.step)
        if action == "start":
            state.trial_snapshot = {
                "model": _cpu_copy(state.model.state_dict()),
                "optimizer": _cpu_copy(state.optimizer.state_dict()),
            }
        elif action == "rollback":
            state.model.load_state_dict(state.trial_snapshot["model"])
            state.optimizer.load_state_dict(state.trial_snapshot["optimizer"])
        if action in ("keep", "rollback"):
            state.trial_snapshot = None
        return action
