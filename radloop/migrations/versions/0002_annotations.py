"""annotations

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 17:11:10.814036
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "annotations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("draft_key", sa.String(length=200), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("study_revision", sa.Integer(), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=True),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("priority", sa.Float(), nullable=True),
        sa.Column("uncertainty", sa.Float(), nullable=True),
        sa.Column("seg_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("seg_series_uid", sa.String(length=64), nullable=True),
        sa.Column("seg_path", sa.String(length=256), nullable=True),
        sa.Column("nifti_path", sa.String(length=256), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("draft_key"),
        sa.UniqueConstraint("seg_sop_instance_uid"),
    )
    with op.batch_alter_table("annotations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_annotations_priority"), ["priority"], unique=False)
        batch_op.create_index(batch_op.f("ix_annotations_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_annotations_study_id"), ["study_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("annotations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_annotations_study_id"))
        batch_op.drop_index(batch_op.f("ix_annotations_state"))
        batch_op.drop_index(batch_op.f("ix_annotations_priority"))

    op.drop_table("annotations")
