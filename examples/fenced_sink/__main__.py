"""``python -m examples.fenced_sink serve|write|stats`` — see ``--help``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

from . import sink


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m examples.fenced_sink",
        description="A fenced HTTP sink: accepts a write only if its fencing token is not lower than the highest "
        "token it has seen; a second write of the same key is a harmless duplicate.",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="run the sink (prints its URL on the first line)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="log every request on stderr")
    p = sub.add_parser("write", help="PUT a value; exit 0 if applied or duplicate, 3 if refused as stale")
    p.add_argument("key")
    p.add_argument("value", nargs="?", default="")
    p.add_argument("--url", default=os.environ.get("SINK_URL", "http://127.0.0.1:8080"),
                   help="the sink (default: $SINK_URL or %(default)s)")
    p.add_argument("--token", type=int, default=None,
                   help="fencing token (default: $COORD_FENCING_TOKEN, as the examples pass it to jobs)")
    p.add_argument("--writer", default="", help="a name recorded with the write")
    p = sub.add_parser("stats", help="print the sink's state as JSON")
    p.add_argument("--url", default=os.environ.get("SINK_URL", "http://127.0.0.1:8080"))
    args = parser.parse_args(argv)

    if args.cmd == "serve":
        server = sink.serve(args.host, args.port, verbose=args.verbose)
        signal.signal(signal.SIGTERM, _interrupt)  # stop cleanly (exit 0) on SIGTERM as on Ctrl-C
        host, port = server.server_address[:2]
        print(f"ts={time.time():.6f} event=listening url=http://{host!s}:{port}", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()
        return 0
    if args.cmd == "write":
        token = args.token if args.token is not None else int(os.environ.get("COORD_FENCING_TOKEN", "0"))
        try:
            res = sink.write(args.url, args.key, args.value, token, writer=args.writer)
        except OSError as exc:
            print(f"fenced_sink: cannot write to {args.url}: {exc}", file=sys.stderr)
            return 1
        print(f"{res.outcome} key={args.key} token={token} max_token={res.max_token}")
        return 3 if res.outcome == "stale" else 0
    json.dump(sink.stats(args.url), sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
