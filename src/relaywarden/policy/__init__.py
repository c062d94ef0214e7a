"""Relay policy: the pure relay decision per recipient, and configuration audits (open relay). No I/O."""
