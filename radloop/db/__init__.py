"""The state store: tables, engine, migrations."""

from radloop.db.engine import (
    SchemaOutdated,
    Store,
    insert_ignoring_conflict,
    make_engine,
    upgrade,
)
from radloop.db.models import (
    Annotation,
    AnnotationJob,
    Base,
    Cursor,
    HoldoutScore,
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
    "HoldoutScore",
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
    "insert_ignoring_conflict",
    "make_engine",
    "upgrade",
    "utcnow",
]
