"""``python -m lposs`` runs the command line (also what torchrun launches)."""

from .cli import main

raise SystemExit(main())
