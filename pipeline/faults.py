"""Test-only fault injection: make a model stage crash its worker process, raise or stall on chosen rows.

Off unless the ``KARLO_FAULTS`` environment variable is set, which nobody does outside the fault tests. The
tests set it for a ``karlo generate`` process, whose local Ray workers inherit it. Its value is a
comma-separated list of ``stage:key:mode[:times]`` rules:

- ``stage``: ``prior``, ``decoder`` or ``super_res``;
- ``key``: the row key that triggers the fault (a batch holding that row fails as a whole);
- ``mode``: ``crash`` ends the worker process at once with ``os._exit(CRASH_EXIT_CODE)``, as a segfault or the
  OOM killer would; ``raise`` raises :class:`InjectedFault`, as a bug in the stage would; ``stall`` sleeps for
  ``STALL_SECONDS``, as a hung device or a stuck read would (so that a test can act on a run that is surely
  still going);
- ``times``: how often the rule fires (default: every time). Counting survives the crashes it causes: each
  firing creates one file in the folder named by ``KARLO_FAULTS_STATE``, which a counted rule requires.

Example: ``KARLO_FAULTS=decoder:img-03:crash:1,prior:img-05:raise`` crashes the decoder actor once on
``img-03`` (Ray restarts it and retries the batch) and makes ``img-05`` an error row of the prior stage.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from typing import Iterable

ENV = "KARLO_FAULTS"
STATE_ENV = "KARLO_FAULTS_STATE"
MODES = ("crash", "raise", "stall")
CRASH_EXIT_CODE = 87  # distinctive in worker logs
STALL_SECONDS = 600.0


class InjectedFault(RuntimeError):
    """The error a ``raise`` rule raises."""


@dataclass(frozen=True)
class Rule:
    stage: str
    key: str
    mode: str
    times: int | None  # None: always


def parse(spec: str) -> tuple[Rule, ...]:
    """The rules of a ``KARLO_FAULTS`` value; ValueError names a malformed one."""
    rules = []
    for item in filter(None, (part.strip() for part in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (3, 4) or parts[2] not in MODES or not parts[0] or not parts[1]:
            raise ValueError(f"{ENV}: {item!r} is not stage:key:{'|'.join(MODES)}[:times]")
        times = None
        if len(parts) == 4:
            if not parts[3].isdigit() or int(parts[3]) < 1:
                raise ValueError(f"{ENV}: times must be a positive integer in {item!r}")
            times = int(parts[3])
        rules.append(Rule(parts[0], parts[1], parts[2], times))
    return tuple(rules)


@functools.cache
def _rules(spec: str) -> tuple[Rule, ...]:
    return parse(spec)


def inject(stage: str, keys: Iterable[str]) -> None:
    """Fire the first matching rule for a batch of ``stage`` holding ``keys``; a no-op when no rule is set."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    keys = set(keys)
    for rule in _rules(spec):
        if rule.stage == stage and rule.key in keys and _take_one(rule):
            if rule.mode == "crash":
                os._exit(CRASH_EXIT_CODE)
            if rule.mode == "stall":
                time.sleep(STALL_SECONDS)
                return
            raise InjectedFault(f"injected fault in stage {stage} on row {rule.key}")


def _take_one(rule: Rule) -> bool:
    """Whether the rule may fire once more; counts the firing in the state folder."""
    if rule.times is None:
        return True
    state = os.environ.get(STATE_ENV)
    if not state:
        raise ValueError(f"{ENV}: a rule with a count needs {STATE_ENV} (a folder shared by the worker processes)")
    for n in range(rule.times):
        try:
            # O_EXCL makes the claim atomic: two processes never take the same firing.
            os.close(os.open(os.path.join(state, f"{rule.stage}-{rule.key}-{n}"), os.O_CREAT | os.O_EXCL))
            return True
        except FileExistsError:
            continue
    return False
