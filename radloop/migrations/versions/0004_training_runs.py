"""training runs: one row per retraining, with its manifest, MLflow ids and decision

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 19:55:27.953310
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "training_runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("trigger", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("label_ids", sa.JSON(), nullable=True),
        sa.Column("holdout_label_ids", sa.JSON(), nullable=True),
        sa.Column("parent_version", sa.Integer(), nullable=True),
        sa.Column("epoch", sa.Integer(), nullable=False),
        sa.Column("epochs", sa.Integer(), nullable=False),
        sa.Column("loss", sa.Float(), nullable=True),
        sa.Column("mlflow_run_id", sa.String(length=64), nullable=True),
        sa.Column("mlflow_version", sa.String(length=16), nullable=True),
        sa.Column("triton_version", sa.Integer(), nullable=True),
        sa.Column("champion_dice", sa.JSON(), nullable=True),
        sa.Column("challenger_dice", sa.JSON(), nullable=True),
        sa.Column("decision", sa.Text(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_training_runs_model_name"), ["model_name"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_training_runs_started_at"), ["started_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_training_runs_state"), ["state"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_runs_state"))
        batch_op.drop_index(batch_op.f("ix_training_runs_started_at"))
        batch_op.drop_index(batch_op.f("ix_training_runs_model_name"))

    op.drop_table("training_runs")
