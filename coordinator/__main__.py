import sys

from fedgen.coordinator.cli import main

sys.exit(main())
