"""Container health check without curl: exit 0 if every URL given answers HTTP 200 within the timeout."""

from __future__ import annotations

import sys
import urllib.request

timeout_s = 3.0


def main(urls: list[str]) -> int:
    if not urls:
        sys.stderr.write("usage: healthcheck.py URL [URL ...]\n")
        return 2
    for url in urls:
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                if response.status != 200:
                    sys.stderr.write(f"{url}: HTTP {response.status}\n")
                    return 1
        except OSError as error:
            sys.stderr.write(f"{url}: {error}\n")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
