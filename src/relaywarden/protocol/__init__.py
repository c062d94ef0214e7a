"""Sans-I/O SMTP: the server and client state machines, address parsing, PROXY protocol and SASL. No asyncio or socket imports here."""
