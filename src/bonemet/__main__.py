import sys

from bonemet.cli import main

sys.exit(main())
