import sys

from tugboat.cli import main

sys.exit(main())
