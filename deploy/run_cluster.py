"""``python -m deploy.run_cluster``: what ``make run-cluster`` executes."""

import sys

from deploy.stack.cluster import main

if __name__ == "__main__":
    sys.exit(main())
