"""``python -m broker`` is the ``keybroker`` command."""

import sys

from broker.cli import main

sys.exit(main())
