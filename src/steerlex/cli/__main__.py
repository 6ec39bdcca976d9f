import sys

from steerlex.cli import main

sys.exit(main())
