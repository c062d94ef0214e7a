"""asyncio listeners that drive the sans-I/O protocol core: TLS, AUTH, PROXY protocol, limits."""
