import sys

from pyro_ext.demo._runner import main

sys.exit(main())
