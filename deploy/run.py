"""``python -m deploy.run``: what ``make run`` executes."""

import sys

from deploy.stack.runner import main

if __name__ == "__main__":
    sys.exit(main())
