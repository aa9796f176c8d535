"""Storage: engine, tables, repositories and Alembic migrations (PostgreSQL or embedded SQLite)."""
