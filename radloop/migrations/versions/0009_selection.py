"""selection: active-learning strategies per model, and a record of every selection

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 13:00:00.000000

The worklist's order was one stored `priority` (the draft's uncertainty plus an urgency boost).
It is now ranked by each model's strategy (`agents.selection`) from what the draft carries —
its uncertainty scores and embedding — so `priority` goes; `model_settings` holds the chosen
strategy and seed, `selections` what was handed to whom, by which strategy, with which scores,
and each training run the strategies that selected its labels.
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("annotations") as batch_op:
        batch_op.add_column(sa.Column("scores", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("embedding", sa.LargeBinary(), nullable=True))
        batch_op.drop_index("ix_annotations_priority")
        batch_op.drop_column("priority")
    with op.batch_alter_table("training_runs") as batch_op:
        batch_op.add_column(sa.Column("strategies", sa.JSON(), nullable=True))
    op.create_table(
        "model_settings",
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("changed_by", sa.String(length=64), nullable=True),
        sa.Column("changed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("model_name"),
    )
    op.create_table(
        "selections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("annotation_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("model_version", sa.String(length=32), nullable=True),
        sa.Column("user_name", sa.String(length=64), nullable=False),
        sa.Column("strategy", sa.String(length=32), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("scores", sa.JSON(), nullable=True),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("batch", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["annotation_id"], ["annotations.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_selections_annotation_id", "selections", ["annotation_id"])


def downgrade() -> None:
    op.drop_index("ix_selections_annotation_id", table_name="selections")
    op.drop_table("selections")
    op.drop_table("model_settings")
    with op.batch_alter_table("training_runs") as batch_op:
        batch_op.drop_column("strategies")
    with op.batch_alter_table("annotations") as batch_op:
        batch_op.add_column(sa.Column("priority", sa.Float(), nullable=True))
        batch_op.create_index("ix_annotations_priority", ["priority"])
        batch_op.drop_column("embedding")
        batch_op.drop_column("scores")
