"""``python -m memfs``: the memfs command."""
import sys

from .cli import main

sys.exit(main())
