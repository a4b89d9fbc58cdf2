"""Alembic environment: runs our migrations against the URL ``ratepay_oms.persistence.db``
puts in the config (``upgrade(url)``), with the same engine settings the application uses."""

from __future__ import annotations

import importlib
import pkgutil

from alembic import context

import ratepay_oms.persistence
from ratepay_oms.persistence.base import Base
from ratepay_oms.persistence.db import create_db_engine, default_database_url

# Every module of the persistence package registers its tables on Base (autogenerate and
# ``check`` must see them all, not only the engine's).
for _module in pkgutil.iter_modules(ratepay_oms.persistence.__path__):
    importlib.import_module(f"ratepay_oms.persistence.{_module.name}")

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url") or default_database_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_db_engine(config.get_main_option("sqlalchemy.url") or default_database_url())
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
