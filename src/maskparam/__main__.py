"""``python -m maskparam``: run the demo (see :mod:`maskparam.demo`)."""

from maskparam.demo import main

raise SystemExit(main())
