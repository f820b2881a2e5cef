"""The phase of a run in progress, from its step events and a clock.

One function, `run_phase`, shared by the CLI's progress line and the panel's status line,
so both say the same thing: ``starting`` (no step yet: the process, imports, data),
``warm-up`` (steps before the budget's clock starts: compile), ``training`` (the time so far
and an estimate of the training left) and ``evaluating`` (the budget is spent and no step
comes any more: the runner scores the model). Nothing here imports the rest of the kit.

    phase, detail = run_phase(t0, [(arrival, event), ...], now=time.monotonic())
"""

from __future__ import annotations

from typing import Sequence


def run_phase(t0: float, events: Sequence[tuple[float, dict]], now: float,
              eval_s: float | None = None) -> tuple[str, str]:
    """Name the phase of a run and say how long it has run and what is left.

    Parameters
    ----------
    t0 : float
        When the run started (the clock `now` is read from).
    events : sequence of (arrival, event)
        The run's step events so far (``step``, ``progress`` 0..1, ``elapsed`` training
        seconds), each with the clock time it arrived; only the last two are read.
    now : float
        The clock now.
    eval_s : float, optional
        How long scoring took last time (e.g. the parent's ``eval_seconds``): with it the
        estimate of what is left includes the evaluation.

    Returns
    -------
    (str, str)
        The phase (``starting``, ``warm-up``, ``training``, ``evaluating``) and a detail
        such as ``"20s, ~15s of training left"``.
    """
    since = f"{max(now - t0, 0.0):.0f}s"
    hint = eval_s if isinstance(eval_s, (int, float)) and eval_s > 0 else None
    if not events:
        return "starting", since
    at, last = events[-1]
    p = float(last.get("progress") or 0.0)
    if p <= 0.0:
        return "warm-up", f"{since} (warm-up steps, not counted)"
    done = p >= 0.999
    if not done and len(events) >= 2:
        # the budget refuses the step after the last one: the last step event can be short of 1
        prev = events[-2][1]
        steps = (last.get("step") or 0) - (prev.get("step") or 0)
        dp = p - float(prev.get("progress") or 0.0)
        done = steps > 0 and dp > 0 and p + 2 * dp / steps >= 0.999
    if done and now - at > 1.0:
        scoring = now - at
        if hint is not None:
            left = f", ~{hint - scoring:.0f}s left" if scoring < hint else ", longer than last time"
            return "evaluating", f"{since}, scoring for {scoring:.0f}s{left}"
        return "evaluating", f"{since}, scoring for {scoring:.0f}s"
    elapsed = last.get("elapsed")
    left = ""
    if isinstance(elapsed, (int, float)) and 0 < p < 1:
        left = f", ~{elapsed / p * (1 - p):.0f}s of training left"
        if hint is not None:
            left += f" then ~{hint:.0f}s scoring"
    return "training", f"{since}{left}"
