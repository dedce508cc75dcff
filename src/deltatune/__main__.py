"""``python -m deltatune ...`` runs the ``deltatune`` command (also what ``torchrun -m deltatune`` starts)."""

from .cli import main

raise SystemExit(main())
