"""Test support: a real relaywarden server in a child process, and a raw SMTP client."""
