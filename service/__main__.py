"""`python -m tlserve.service` (and `tlserve serve`): run the tlserve server.

Settings come from flags and TLSERVE_* environment variables (see
`service.config`). A bad setting, an unusable home or a port that can't be
bound prints one line and exits non-zero before anything is served.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from tlserve.service import logs
from tlserve.service.config import Settings
from tlserve.service.errors import TLServeError


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = Settings.load(sys.argv[1:] if argv is None else argv)
        logs.setup(settings.log_level, settings.log_format)
        # Imported after the settings are known good: it loads torch (seconds),
        # and a mistyped flag should fail at once.
        try:
            from tlserve.service.server import serve
        except ImportError as e:  # the client-only install: `pip install tlserve`
            print(f"tlserve: error: the server's dependencies are not installed ({e}); install tlserve[server]",
                  file=sys.stderr)
            return 2

        asyncio.run(serve(settings))
    except TLServeError as e:
        print(f"tlserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C while draining
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
