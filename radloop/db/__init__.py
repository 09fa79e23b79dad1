"""The state store: tables, engine, migrations."""

from radloop.db.engine import SchemaOutdated, Store, make_engine, upgrade
from radloop.db.models import (
    Annotation,
    Base,
    Cursor,
    Instance,
    Label,
    OutboxEvent,
    Series,
    Study,
    TrainingRun,
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
    "SchemaOutdated",
    "Series",
    "Store",
    "Study",
    "TrainingRun",
    "User",
    "WebSession",
    "make_engine",
    "upgrade",
    "utcnow",
]
