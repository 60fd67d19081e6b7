"""Command-line spelling of config overrides: ``--train.max_steps=500`` as well as ``train.max_steps=500``.

A recipe's keys are overridden with dotted ``section.key=value`` words after the options. Users
coming from other tools write them as options too (``--train.max_steps=500`` or
``--train.max_steps 500``); :func:`normalize_override_args` rewrites those to the dotted form
before argparse sees them, leaving real options (``--config``, ``--quiet``: no dot in the name)
and everything after a bare ``--`` alone. Parse the result with ``parse_intermixed_args`` so
overrides may stand before, between or after the options.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lmforge.errors import ConfigError

__all__ = ["normalize_override_args"]

# --section.key[.more]=value or --section.key (value in the next word); identifiers with - or _.
_OPTION = re.compile(r"^--([A-Za-z_][\w-]*(?:\.[A-Za-z_][\w-]*)+)(?:=(.*))?$", re.S)


def normalize_override_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with every ``--a.b=v`` / ``--a.b v`` turned into ``a.b=v`` (dashes in the key
    names become underscores: ``--train.max-steps=5`` is ``train.max_steps=5``).

    A dotted option with no value (the last word, or followed by another option) is a
    :class:`ConfigError` naming it.
    """
    out: list[str] = []
    words = list(argv)
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--":  # everything after is positional: leave it as typed
            out.extend(words[i:])
            break
        m = _OPTION.match(word)
        if m is None:
            out.append(word)
            i += 1
            continue
        key, value = m.group(1).replace("-", "_"), m.group(2)
        if value is None:
            if i + 1 >= len(words) or words[i + 1].startswith("--"):
                raise ConfigError(f"--{m.group(1)}: expected a value (--{m.group(1)}=VALUE or "
                                  f"{key}=VALUE)")
            value = words[i + 1]
            i += 1
        out.append(f"{key}={value}")
        i += 1
    return out
