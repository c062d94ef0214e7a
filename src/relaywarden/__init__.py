"""relaywarden: a mail relay whose every relay decision is explained."""

__version__ = "0.1.0"
