import sys
from loom.launch.cli import main
sys.exit(main())
