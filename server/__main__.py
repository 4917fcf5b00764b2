"""`python -m tiffin.server VERB ...` is the same as `serverctl VERB ...`."""

import sys

from .cli import main

sys.exit(main())
