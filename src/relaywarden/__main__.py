"""``python -m relaywarden`` is the ``relaywarden`` command."""

from .cli.main import main

main()
