import sys

from domlora.cli import main

sys.exit(main())
