"""What a command reads of Prefect's home without importing Prefect: the active profile, and
whether the local database is migrated already (then the temporary API need not check again).

Importing Prefect costs a command seconds; these answers cost milliseconds, and every one of
them errs on the side of Prefect's own behaviour (no answer: Prefect decides).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sqlite3
import tomllib
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Settings that choose another database than the home's ``prefect.db``, or decide the
#: migration themselves: with any of them set, Prefect's default (migrate on start) stands.
_DATABASE_SETTINGS = (
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_API_DATABASE_MIGRATE_ON_START",
    "PREFECT_SERVER_DATABASE_MIGRATE_ON_START",
)
_REVISION = re.compile(r'^(down_revision|revision)\s*=\s*(?:"([0-9a-f]+)"|None)', re.M)


def prefect_home() -> Path:
    """``PREFECT_HOME`` (default ``~/.prefect``)."""
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def active_profile() -> dict[str, Any]:
    """The settings of the active profile of ``PREFECT_PROFILES_PATH`` (default
    ``PREFECT_HOME/profiles.toml``); empty when there is none or it cannot be read."""
    default = prefect_home() / "profiles.toml"
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or default).expanduser()
    try:
        profiles = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    profile = profiles.get("profiles", {}).get(active, {})
    return profile if isinstance(profile, dict) else {}


def head_revision() -> str | None:
    """The newest SQLite migration of the installed Prefect (the one no other follows), read
    from its migration files; None when it cannot be told for sure."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:  # pragma: no cover - a dependency
        return None
    folder = Path(spec.origin).parent / "server/database/_migrations/versions/sqlite"
    revisions: set[str] = set()
    followed: set[str] = set()
    for path in folder.glob("*.py"):
        found = dict((m[0], m[1]) for m in _REVISION.findall(path.read_text()))
        if not found.get("revision"):
            return None  # a layout this reader does not know: let Prefect check
        revisions.add(found["revision"])
        if found.get("down_revision"):
            followed.add(found["down_revision"])
    heads = revisions - followed
    return heads.pop() if len(heads) == 1 else None


def database_at_head() -> bool:
    """True when the temporary API's database is the home's ``prefect.db`` and is migrated to
    the installed Prefect's newest revision already, so its start may skip the migration check
    (half a second). False whenever that is not certain."""
    profile = active_profile()
    if any(os.environ.get(name) or profile.get(name) for name in _DATABASE_SETTINGS):
        return False
    database = prefect_home() / "prefect.db"
    if not database.is_file():
        return False
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=1) as connection:
            rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.Error as e:
        logger.debug("could not read the revision of %s (%s)", database, e)
        return False
    head = head_revision()
    return head is not None and [row[0] for row in rows] == [head]


__all__ = ["active_profile", "database_at_head", "head_revision", "prefect_home"]
