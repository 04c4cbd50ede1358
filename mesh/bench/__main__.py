import sys

from mesh.bench import main

sys.exit(main())
