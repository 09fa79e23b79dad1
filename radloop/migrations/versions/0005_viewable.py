"""viewer store: when a case's images and draft SEG are readable through DICOMweb, and why not

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 09:20:00.000000

Cases that readers have already worked on (corrected, validated) count as viewable; open ones
start unviewable, so the viewer-store reconciler of the next `radloop up` puts their images
into Orthanc (before this revision, studies received over C-STORE or the watch folder never
reached it).
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("annotations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("viewable_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("viewer_error", sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f("ix_annotations_viewable_at"), ["viewable_at"])
    op.execute(
        "UPDATE annotations SET viewable_at = updated_at WHERE state IN ('corrected', 'validated')"
    )


def downgrade() -> None:
    with op.batch_alter_table("annotations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_annotations_viewable_at"))
        batch_op.drop_column("viewer_error")
        batch_op.drop_column("viewable_at")
