"""Alembic environment: runs on the connection radloop hands it (see radloop.db.upgrade)."""

from alembic import context
from sqlalchemy import create_engine

from radloop.db.models import Base

config = context.config
connection = config.attributes.get("connection")

if connection is None:
    # `alembic revision --autogenerate` from a shell: use the URL given with -x url=...
    url = context.get_x_argument(as_dictionary=True).get("url", "sqlite:///:memory:")
    with create_engine(url).connect() as conn:
        context.configure(connection=conn, target_metadata=Base.metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
else:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
