import sys

from selfclust.cli import main

sys.exit(main())
