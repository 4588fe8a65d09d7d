"""``python -m hf_slicegpt.cli``: the same as the ``hf-slicegpt`` command."""

import sys

from ..cli import main

sys.exit(main())
