"""A quiet driver: the user reads our progress line and summary, not Ray's start-up, per-operator progress and
advisory warnings (``karlo --verbose`` keeps all of them).

Most of Ray's switches are read when Ray is imported, so :func:`quiet_ray` must run before that; Ray Data sets its
loggers' levels when it is imported, so :func:`quiet_ray_data` runs once the driver has started Ray.
"""

from __future__ import annotations

import logging
import os
import warnings

# Advisory messages with nothing for the user to do: the token-authentication notice of a private local Ray
# (which keeps its token), and Ray Data's notes on pools that received fewer blocks than their minimum size.
_QUIET_LOGGERS = ("ray._private.authentication.authentication_token_setup",)
_QUIET_WARNINGS = (r"The (minimum|maximum) number of concurrent (actors|tasks) for .* but the operator only received",)


_quiet = False


def quiet_ray() -> None:
    global _quiet
    _quiet = True
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")  # "Started a local Ray instance." and the like
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # also the progress lines logged without a tty
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def quiet_ray_data() -> None:
    """After :func:`quiet_ray`: Ray Data's execution plans, "Dataset ... finished" and tuning notes off."""
    if _quiet:
        logging.getLogger("ray.data").setLevel(logging.ERROR)
