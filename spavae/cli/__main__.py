"""``python -m spavae.cli`` runs the command line (how ``spavae train --devices N`` starts its torchrun ranks)."""

import sys

from spavae.cli import main

sys.exit(main())
