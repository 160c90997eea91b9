"""When a cross-task server should mix tasks in a pass: whichever way serves rows faster under the load now.

Mixing pays where passes cost mostly a fixed overhead (MiniLM: 64 tasks of one length) and not where they cost
mostly per row (SmolLM2: compute-bound, sentences beside sentence pairs). Neither a model nor the passes of
one moment decide it: one-task passes right after a mixed pass are small (the mixed pass emptied every queue),
and under one-task passes each task's queue grows while the other tasks run, so their passes grow too. So the
rule measures each way in its own steady state, as a bandit in epochs: run mixed passes, then one-task passes,
each for a settling stretch (not measured) and a measured one; then run the way that served rows in fewer
busy seconds per row for `EXPLOIT` times as long as both probes took, and probe again (the load may change).
A load that moves far from the one probed (the rows waiting when the rule is asked, a moving average against
the probes' mean, off by more than `LOAD_CHANGE` times either way) ends the stretch early: a mixed pass that
held every client of a light load would otherwise keep the next pass as large, and so keep itself chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SETTLE = 2  # passes of a probe run before it measures (one turn round the waiting tasks for one-task passes)
MEASURE = 8  # passes a probe measures (at least one turn round the tasks for one-task passes)
MAX_TURN = 16  # the longest turn round the tasks a probe waits for
EXPLOIT = 10.0  # the better way runs this many times as long (busy seconds) as both probes together took
LOAD_CHANGE = 2.0  # ... unless the rows waiting move this many times away from the probes' mean (either way)
LOAD_WEIGHT = 0.2  # the weight of the newest decision in the moving average of the rows waiting


@dataclass
class _Probe:
    mixed: bool
    settle: int
    measure: int
    seconds: float = 0.0
    rows: int = 0
    done: int = 0  # passes of this probe run so far (settling included)


@dataclass
class MixRule:
    """`mix(tasks, waiting)` is asked before each pass that could mix (how many tasks have rows waiting, and how
    many rows); `observe` is told about every pass run, mixed or not."""

    settle: int = SETTLE
    measure: int = MEASURE
    exploit: float = EXPLOIT
    cost: dict[bool, float] = field(default_factory=dict)  # the last probes' busy seconds per row: mixed, one-task
    epochs: int = 0  # times both ways were probed (started)
    _probes: list[_Probe] = field(default_factory=list)  # this epoch's probes still to run (the first is running)
    _exploit_left: float = 0.0  # busy seconds the chosen way still runs before the next probes
    _probe_seconds: float = 0.0
    _pending: _Probe | None = None  # the probe the pass just chosen counts towards (None: not measured)
    _probe_load: list[int] = field(default_factory=list)  # the rows waiting at each decision of this epoch's probes
    _load: float = 0.0  # their mean once probed, then a moving average of the rows waiting at each decision

    def mix(self, tasks: int, waiting: int) -> bool:
        if not self._probes and self._exploit_left > 0 and self._load_moved(waiting):
            self._exploit_left = 0.0
        if not self._probes and self._exploit_left <= 0:  # a new epoch: probe both ways
            turn = min(max(tasks, 1), MAX_TURN)
            self._probes = [_Probe(True, self.settle, self.measure),
                            _Probe(False, max(self.settle, turn), max(self.measure, turn))]
            self._probe_seconds, self._probe_load = 0.0, []
            self.epochs += 1
        if self._probes:
            self._probe_load.append(waiting)
            probe = self._probes[0]
            self._pending = probe
            return probe.mixed
        self._pending = None
        return self.cost[True] <= self.cost[False]

    def _load_moved(self, waiting: int) -> bool:
        if not self._load:
            return False
        probed = sum(self._probe_load) / max(1, len(self._probe_load))
        self._load = (1 - LOAD_WEIGHT) * self._load + LOAD_WEIGHT * waiting
        return not probed / LOAD_CHANGE <= self._load <= probed * LOAD_CHANGE

    def observe(self, mixed: bool, rows: int, seconds: float) -> None:
        probe, self._pending = self._pending, None
        if probe is None:
            if not self._probes:
                self._exploit_left -= seconds
            return
        self._probe_seconds += seconds
        if mixed != probe.mixed:
            return
        probe.done += 1
        if probe.done > probe.settle:
            probe.seconds, probe.rows = probe.seconds + seconds, probe.rows + rows
        if probe.done >= probe.settle + probe.measure:
            self.cost[probe.mixed] = probe.seconds / max(1, probe.rows)
            self._probes.pop(0)
            if not self._probes:
                self._exploit_left = self.exploit * self._probe_seconds
                self._load = sum(self._probe_load) / max(1, len(self._probe_load))

    @property
    def probing(self) -> bool:
        return bool(self._probes)
