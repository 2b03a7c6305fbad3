import sys

from memfs.bench.run import main

sys.exit(main())
