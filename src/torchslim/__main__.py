"""``python -m torchslim`` (what ``torchrun ... -m torchslim compress RECIPE`` runs)."""

import sys

from torchslim.cli import main

sys.exit(main())
