"""`python -m tlserve.service.jobs.launch CMD [ARGS...]`: run CMD so that it dies with its parent.

Sets Linux's PR_SET_PDEATHSIG (SIGKILL), which survives exec, then replaces
itself with CMD. The job runner starts every worker (or torchrun, whose own
children set the same flag) through this, so when the server dies, even by
kill -9, no training process keeps running unsupervised; the job is resumed
from its checkpoint when the server starts again. (Setting it from the
server with `preexec_fn` would not be safe in a threaded process.)
"""

from __future__ import annotations

import os
import sys

from tlserve.service.childproc import die_with_parent


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m tlserve.service.jobs.launch CMD [ARGS...]")
    die_with_parent()
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
