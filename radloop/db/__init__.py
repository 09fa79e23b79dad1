"""The state store: tables, engine, migrations."""

from radloop.db.engine import Store, make_engine, upgrade
from radloop.db.models import (
    Annotation,
    Base,
    Cursor,
    Instance,
    Label,
    OutboxEvent,
    Series,
    Study,
    User,
    WebSession,
    utcnow,
)

__all__ = [
    "Annotation",
    "Base",
    "Cursor",
    "Instance",
    "Label",
    "OutboxEvent",
    "Series",
    "Store",
    "Study",
    "User",
    "WebSession",
    "make_engine",
    "upgrade",
    "utcnow",
]
