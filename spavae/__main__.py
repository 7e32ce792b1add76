"""``python -m spavae`` runs the command line."""

import sys

from spavae.cli import main

sys.exit(main())
