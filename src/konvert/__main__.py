import sys

from konvert.cli import main

sys.exit(main())
