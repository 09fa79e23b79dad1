"""The state store: tables, engine, migrations."""

from radloop.db.engine import SchemaOutdated, Store, make_engine, upgrade
from radloop.db.models import (
    Annotation,
    AnnotationJob,
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
    Worker,
    utcnow,
)

__all__ = [
    "Annotation",
    "AnnotationJob",
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
    "Worker",
    "make_engine",
    "upgrade",
    "utcnow",
]
