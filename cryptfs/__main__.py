import sys

from cryptfs.cli import main

sys.exit(main())
