"""When a cross-task server should mix tasks in a pass: whichever way serves rows faster under the load now.

Mixing pays where passes cost mostly a fixed overhead (MiniLM: 64 tasks of one length) and not where they cost
mostly per row (SmolLM2: compute-bound, sentences beside sentence pairs). Neither a model nor the passes of
one moment decide it: one-task passes right after a mixed pass are small (the mixed pass emptied every queue),
and under one-task passes each task's queue grows while the other tasks run, so their passes grow too. So the
rule measures each way in its own steady state, as a bandit in epochs: run mixed passes, then one-task passes,
each for a settling stretch (not measured) and a measured one; then run the way that served rows in fewer
busy seconds per row for `EXPLOIT` times as long as both probes took, and probe again (the load may change).
The load is the batcher's moving average of the rows in the server (waiting or in the running pass) as each
request arrives: in a closed loop, about the number of clients, whichever way is running. Two probes that saw
loads more than `LOAD_CHANGE` times apart are not compared: both ways are probed again. A load that moves that
far from the one probed ends the stretch early: a mixed pass that held every client of a light load would
otherwise keep the next pass as large, and so keep itself chosen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SETTLE = 2  # passes of a probe run before it measures (one turn round the waiting tasks for one-task passes)
MEASURE = 8  # passes a probe measures (at least one turn round the tasks for one-task passes)
MAX_TURN = 16  # the longest turn round the tasks a probe waits for
EXPLOIT = 10.0  # the better way runs this many times as long (busy seconds) as both probes together took
LOAD_CHANGE = 2.0  # ... unless the load moves this many times away from the probes' mean (either way)
LOAD_WEIGHT = 0.05  # the weight of the newest request in the batcher's moving average of the rows in the server


@dataclass
class _Probe:
    mixed: bool
    settle: int
    measure: int
    seconds: float = 0.0
    rows: int = 0
    done: int = 0  # passes of this probe run so far (settling included)
    loads: list[float] = field(default_factory=list)  # the load at each of its decisions

    @property
    def load(self) -> float:
        return sum(self.loads) / max(1, len(self.loads))


@dataclass
class MixRule:
    """`mix(tasks, load)` is asked before each pass that could mix (how many tasks have rows waiting, and the
    load); `observe` is told about every pass run, mixed or not."""

    settle: int = SETTLE
    measure: int = MEASURE
    exploit: float = EXPLOIT
    cost: dict[bool, float] = field(default_factory=dict)  # the last probes' busy seconds per row: mixed, one-task
    epochs: int = 0  # times both ways were probed (started)
    _probes: list[_Probe] = field(default_factory=list)  # this epoch's probes still to run (the first is running)
    _exploit_left: float = 0.0  # busy seconds the chosen way still runs before the next probes
    _probe_seconds: float = 0.0
    _pending: _Probe | None = None  # the probe the pass just chosen counts towards (None: not measured)
    _done: list[_Probe] = field(default_factory=list)  # this epoch's probes that have finished
    _probed_load: float = 0.0  # the mean load of the last probes

    def mix(self, tasks: int, load: float) -> bool:
        if not self._probes and self._exploit_left > 0 and self._probed_load and not _within(load, self._probed_load):
            self._exploit_left = 0.0  # the load moved far from the one probed
        if not self._probes and self._exploit_left <= 0:  # a new epoch: probe both ways
            turn = min(max(tasks, 1), MAX_TURN)
            self._probes = [_Probe(True, self.settle, self.measure),
                            _Probe(False, max(self.settle, turn), max(self.measure, turn))]
            self._probe_seconds, self._done = 0.0, []
            self.epochs += 1
        if self._probes:
            probe = self._probes[0]
            probe.loads.append(load)
            self._pending = probe
            return probe.mixed
        self._pending = None
        return self.cost[True] <= self.cost[False]

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
            self._done.append(self._probes.pop(0))
            if not self._probes:
                mixed_load, alone_load = (p.load for p in self._done)
                if _within(mixed_load, alone_load):
                    self._exploit_left = self.exploit * self._probe_seconds
                    self._probed_load = (mixed_load + alone_load) / 2
                else:  # measured under different loads: not comparable, probe both again
                    self._exploit_left = 0.0

    @property
    def probing(self) -> bool:
        return bool(self._probes)


def _within(load: float, reference: float) -> bool:
    return reference / LOAD_CHANGE <= load <= reference * LOAD_CHANGE
