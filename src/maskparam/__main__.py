"""``python -m maskparam``: run the demo (see :mod:`maskparam._demo`)."""

from maskparam._demo import main

raise SystemExit(main())
