import sys

from medkd.commands import main

sys.exit(main())
