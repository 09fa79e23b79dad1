"""holdout scores: a model version's Dice on each holdout label, kept for the next gate

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 02:30:00.000000

The gate scored the champion on the whole holdout in every training, on the critical path
from the threshold to serving. A version's score on a holdout label never changes: kept here,
it is computed once (by the gate, or ahead of time by the training worker).
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "holdout_scores",
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("triton_version", sa.Integer(), nullable=False),
        sa.Column("label_id", sa.Integer(), nullable=False),
        sa.Column("dice", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["label_id"], ["labels.id"]),
        sa.PrimaryKeyConstraint("model_name", "triton_version", "label_id"),
    )


def downgrade() -> None:
    op.drop_table("holdout_scores")
