"""row signatures: each ledger row is signed (Ed25519) with a key the database does not hold

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""
import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("promotion_ledger", sa.Column("signature", sa.String(128), nullable=True))


def downgrade() -> None:
    op.drop_column("promotion_ledger", "signature")
