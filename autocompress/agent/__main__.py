import sys

from autocompress.agent import main

sys.exit(main())
