"""Alembic environment for the promotion ledger (run through registry.ledger.migrate)."""

from alembic import context
from sqlalchemy import create_engine

from atelier.registry.ledger import Base

config = context.config
url = config.get_main_option("sqlalchemy.url")

if context.is_offline_mode():
    context.configure(url=url, target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, version_table="atelier_ledger_version")
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
