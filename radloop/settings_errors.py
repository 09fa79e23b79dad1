"""What settings may hold and how a refusal is told: the environment prefix, the keys that
hold secrets (never echoed), the example passwords production refuses, and the one-line-per-key
error `load_settings` raises."""

from __future__ import annotations

from pydantic import ValidationError

ENV_PREFIX = "RADLOOP_"
SECRET_KEYS = frozenset({"password", "database_url"})
# Values shipped in examples (configs/radloop.yaml, deploy/) or left by a hurried install.
PLACEHOLDER_SECRETS = frozenset({"change-me", "changeme", "changethis", "secret", "password"})


class SettingsError(Exception):
    """Start-up refused: each line names the setting (as its environment variable) and why."""


def describe_errors(error: ValidationError) -> str:
    """One line per error naming the variable; the value is echoed only for keys that cannot
    hold a secret."""
    lines = []
    for item in error.errors():
        loc = [str(part) for part in item["loc"]]
        if not loc:  # a rule across settings: its message names the variables
            lines.append(str(item["msg"]).removeprefix("Value error, "))
            continue
        key = ENV_PREFIX + "__".join(loc).upper()
        secret = any(part in SECRET_KEYS for part in loc)
        shown = "" if secret else f" (got {item.get('input')!r})"
        lines.append(f"{key}: {item['msg']}{shown}")
    return "\n".join(lines)
