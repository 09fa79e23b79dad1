"""review: users and browser sessions, claims/leases and corrections, validated labels

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 19:07:56.546001
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=256), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("disabled_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("token_hash"),
    )
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("web_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_web_sessions_expires_at"), ["expires_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_web_sessions_user_id"), ["user_id"], unique=False)

    op.create_table(
        "labels",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("annotation_id", sa.Integer(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=64), nullable=False),
        sa.Column("split", sa.String(length=16), nullable=False),
        sa.Column("series_uid", sa.String(length=64), nullable=False),
        sa.Column("seg_sop_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("image_path", sa.String(length=256), nullable=False),
        sa.Column("label_path", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["annotation_id"],
            ["annotations.id"],
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("annotation_id"),
    )
    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_labels_model_name"), ["model_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_labels_study_id"), ["study_id"], unique=False)

    with op.batch_alter_table("annotations", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("urgent", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("claimed_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("lease_expires_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("corrected_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("corrected_at", sa.DateTime(), nullable=True))
        batch_op.add_column(
            sa.Column("correction_sop_instance_uid", sa.String(length=64), nullable=True)
        )
        batch_op.add_column(sa.Column("correction_path", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("correction_dice", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("correction_dice_per_label", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("validated_by", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("validated_at", sa.DateTime(), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_annotations_lease_expires_at"), ["lease_expires_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_annotations_validated_at"), ["validated_at"], unique=False
        )
        batch_op.create_unique_constraint(
            "uq_annotations_correction_sop_instance_uid", ["correction_sop_instance_uid"]
        )


def downgrade() -> None:
    with op.batch_alter_table("annotations", schema=None) as batch_op:
        batch_op.drop_constraint("uq_annotations_correction_sop_instance_uid", type_="unique")
        batch_op.drop_index(batch_op.f("ix_annotations_validated_at"))
        batch_op.drop_index(batch_op.f("ix_annotations_lease_expires_at"))
        batch_op.drop_column("validated_at")
        batch_op.drop_column("validated_by")
        batch_op.drop_column("correction_dice_per_label")
        batch_op.drop_column("correction_dice")
        batch_op.drop_column("correction_path")
        batch_op.drop_column("correction_sop_instance_uid")
        batch_op.drop_column("corrected_at")
        batch_op.drop_column("corrected_by")
        batch_op.drop_column("lease_expires_at")
        batch_op.drop_column("claimed_by")
        batch_op.drop_column("urgent")

    with op.batch_alter_table("labels", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_labels_study_id"))
        batch_op.drop_index(batch_op.f("ix_labels_model_name"))

    op.drop_table("labels")
    with op.batch_alter_table("web_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_web_sessions_user_id"))
        batch_op.drop_index(batch_op.f("ix_web_sessions_expires_at"))

    op.drop_table("web_sessions")
    op.drop_table("users")
