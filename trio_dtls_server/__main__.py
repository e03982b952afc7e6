"""``python -m trio_dtls_server``: the ``trio-dtls-server`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
