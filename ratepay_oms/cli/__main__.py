"""``python -m ratepay_oms.cli``: the same as the ``ratepay-oms`` command."""

import sys

from ratepay_oms.cli import main

sys.exit(main())
