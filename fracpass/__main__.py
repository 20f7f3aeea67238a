import sys

from fracpass.cli import main

sys.exit(main())
