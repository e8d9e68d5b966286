"""`python -m faqtune` (and `accelerate launch -m faqtune train ...`)."""

import sys

from faqtune.cli import main

sys.exit(main())
