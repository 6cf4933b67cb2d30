import sys

from vfs.cli import main

sys.exit(main())
