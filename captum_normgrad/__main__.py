"""``python -m captum_normgrad``: the same as the ``captum-normgrad`` command."""

import sys

from captum_normgrad.cli import main

if __name__ == "__main__":
    sys.exit(main())
