import sys

from lib.run.runner import main

sys.exit(main())
