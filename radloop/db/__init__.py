"""The state store: tables, engine, migrations."""

from radloop.db.engine import Store, make_engine, upgrade
from radloop.db.models import Annotation, Base, Cursor, Instance, OutboxEvent, Series, Study, utcnow

__all__ = [
    "Annotation",
    "Base",
    "Cursor",
    "Instance",
    "OutboxEvent",
    "Series",
    "Store",
    "Study",
    "make_engine",
    "upgrade",
    "utcnow",
]
