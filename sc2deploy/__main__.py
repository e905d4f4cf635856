"""`python -m sc2deploy`: the same command line as the `sc2deploy` console script."""
import sys

from sc2deploy.cli import main

sys.exit(main())
