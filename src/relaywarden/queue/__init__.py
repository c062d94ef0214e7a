"""The durable message queue (SQLite, WAL, group commit)."""
