"""Refusing configuration values a scheduler does not implement.

The lowest module of the package (it imports nothing from it), so that ``schedule.py`` and ``base.py``
can both use it while imports keep flowing one way: base -> schedule -> options.
"""

from __future__ import annotations


class UnsupportedOptionError(ValueError, NotImplementedError):
    """A configuration value the scheduler does not implement.

    A ValueError, and also a NotImplementedError because diffusers raises that one for an
    unknown ``beta_schedule``: code catching either keeps working.
    """


def check_option(owner: str, name: str, value, allowed) -> None:
    """Refuse ``value`` for option ``name`` unless it is one of ``allowed``."""
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise UnsupportedOptionError(f"{owner}: {name}={value!r} is not supported; choose one of {choices}")
