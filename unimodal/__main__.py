"""``python -m unimodal VERB ...``: the ``unimodal`` command (how a pipeline starts a multi-device stage)."""

import sys

from unimodal.cli import main

sys.exit(main())
