import sys

from fedgen.edge.cli import main

sys.exit(main())
