"""interactions: every click-guided refinement a reader asks for

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 06:00:00.000000

Correction effort counts clicks as well as 1 − Dice, so each refinement is recorded: who,
which case, which interactive model version, the clicks, when, and the refined label kept for
"Accept refined label" (OHIF's MONAI Label panel cannot save).
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "interactions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("annotation_id", sa.Integer(), nullable=False),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=False),
        sa.Column("clicks", sa.JSON(), nullable=False),
        sa.Column("click_count", sa.Integer(), nullable=False),
        sa.Column("label_path", sa.String(length=256), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["annotation_id"], ["annotations.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_interactions_annotation_id", "interactions", ["annotation_id"])


def downgrade() -> None:
    op.drop_index("ix_interactions_annotation_id", table_name="interactions")
    op.drop_table("interactions")
