import sys

from lib.kaggle.package import main

sys.exit(main())
