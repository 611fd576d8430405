import sys

from medkd.cli import main

sys.exit(main())
