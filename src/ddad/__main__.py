"""``python -m ddad``: the ``ddad`` command."""

from .cli import main

raise SystemExit(main())
