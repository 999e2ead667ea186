"""One progress display for a whole build: the running stage, its progress and ETA, and the build's time.

A build (`hiermem build`, training/pipeline.py) runs stages that each take minutes: the prefix states, the
distillation teacher's continuations, the training steps, the output scale's grid, the evaluation. Each
used to print its own bar or, for several, nothing at all for a quarter of an hour. Inside
`build_display()` every stage's `task()` draws on one tqdm line instead, reset for each stage:

    [train] 45%|████▌     | 730/1630 [12:01<14:10, 1.01step/s, flops=47%, build 19:42]

(stage, done / total, elapsed < ETA of the stage, rate, the stage's own figures, the build's wall time so
far). Outside a build display a task is its own tqdm bar, as before, or nothing when progress is off (tests,
ranks other than 0). The build's total ETA is not shown: the later stages' cost is not known until they run
(an evaluation's time depends on how many probes the gate opens).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from typing import Any

_DISPLAY: contextvars.ContextVar[BuildDisplay | None] = contextvars.ContextVar("build_display", default=None)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Task:
    """One stage's progress: `update(n)`, `set_postfix_str(text)`, `close()`."""

    def __init__(self, bar: Any = None, display: BuildDisplay | None = None) -> None:
        self.bar, self.display = bar, display
        self._postfix = ""

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            if self.display is not None:
                self.bar.set_postfix_str(self.display.postfix(self._postfix), refresh=False)
            self.bar.update(n)

    def set_postfix_str(self, text: str) -> None:
        self._postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(self.display.postfix(text) if self.display is not None else text)

    def close(self) -> None:
        if self.bar is not None and self.display is None:  # the build's line lives on to the next stage
            self.bar.close()

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BuildDisplay:
    """The build's one line (a tqdm bar reset for every stage)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.stages: list[str] = []

    def postfix(self, text: str) -> str:
        build = f"build {_clock(time.perf_counter() - self.t0)}"
        return f"{text}, {build}" if text else build

    def task(self, name: str, total: int | None, unit: str, initial: int) -> Task:
        from tqdm import tqdm

        self.stages.append(name)
        if self.bar is None:
            self.bar = tqdm(total=total, initial=initial, desc=f"[{name}]", unit=unit, dynamic_ncols=True)
        else:
            self.bar.unit = unit
            self.bar.set_description_str(f"[{name}]", refresh=False)
            self.bar.reset(total=total)
            # a resumed stage starts at `initial` without counting it in the rate (and so in the ETA)
            self.bar.n = self.bar.last_print_n = self.bar.initial = initial
        task = Task(self.bar, self)
        task.set_postfix_str("")
        return task

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def build_display(enabled: bool = True) -> Iterator[BuildDisplay | None]:
    """Within it, every `task()` draws on the build's one line (nothing with `enabled` False)."""
    if not enabled:
        yield None
        return
    display = BuildDisplay()
    token = _DISPLAY.set(display)
    try:
        yield display
    finally:
        _DISPLAY.reset(token)
        display.close()


def task(name: str, total: int | None, unit: str = "it", initial: int = 0, enabled: bool = True) -> Task:
    """Progress of one stage: on the build's line inside `build_display()`, else its own tqdm bar, else (with
    `enabled` False) nothing."""
    if not enabled:
        return Task()
    display = _DISPLAY.get()
    if display is not None:
        return display.task(name, total, unit, initial)
    from tqdm import tqdm

    return Task(tqdm(total=total, initial=initial, desc=name, unit=unit))
