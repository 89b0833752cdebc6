"""The `tlserve` command line: every tlserve RPC as a subcommand, over the sync `Client`.

    tlserve backbones --family resnet
    tlserve datasets upload ./flowers --name flowers
    tlserve finetune --dataset flowers --model-name flowers --backbone resnet18 --watch
    tlserve predict flowers:1 rose.jpg tulip.jpg --top-k 3
    tlserve --json models            # machine-readable: protobuf JSON, field names as in the proto

The package reads: `render` (formatting, tables, progress bars), `commands` (one
function per subcommand), `parser` (the argument parser), and here `main`, which maps every `TLServeError` to one line on stderr and exit 1
(usage errors exit 2, as argparse does). `tlserve serve ...` hands the rest of
the command line to the server's own `main`, imported only then, so that the
client install needs no server dependencies.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import grpc

from tlserve.client._client import Client
from tlserve.client._common import TLS, TLServeError
from tlserve.client.cli.parser import build_parser

# --- main ----------------------------------------------------------------------------


# Subcommands whose own options pass through untouched (the server's --help, --grpc-address...).
PASSTHROUGH = ("serve", "token")


def _split_passthrough(argv: list[str], commands: Sequence[str] = PASSTHROUGH) -> tuple[str, list[str]] | None:
    """(subcommand, its args) when the subcommand is one of `commands`, else None.

    Done before argparse because those subcommands' own options must pass
    through untouched.
    """
    with_value = {"--address", "--timeout", "--token", "--ca-file", "--cert-file", "--key-file"}
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in with_value:
            i += 2
        elif token.startswith("-"):
            i += 1
        else:
            return (token, argv[i + 1:]) if token in commands else None
    return None


def serve(server_args: list[str]) -> int:
    try:
        from tlserve.service.__main__ import main as serve_main
    except ImportError as err:
        print(f"tlserve: error: the server is not installed ({err}); install tlserve[server]", file=sys.stderr)
        return 2
    return serve_main(server_args)


def make_token(token_args: list[str]) -> int:
    """`tlserve token NAME ROLES`: the server's own token maker, so the line it prints
    is one the server will read (imported only then, like `serve`)."""
    try:
        from tlserve.service.auth import main as token_main
    except ImportError as err:
        print(f"tlserve: error: the server is not installed ({err}); install tlserve[server]", file=sys.stderr)
        return 2
    return token_main(token_args)


def connect(args) -> Client:
    """A client with the global options' address, deadline, token and TLS settings."""
    tls = None
    if args.tls or args.ca_file or args.cert_file or args.key_file:
        tls = TLS(ca_file=args.ca_file, cert_file=args.cert_file, key_file=args.key_file)
    return Client(args.address, timeout=args.timeout if args.timeout is not None else 30.0,
                  token=args.token, tls=tls)


def error_line(err: TLServeError, address: str) -> str:
    message = " ".join(err.message.split())  # one line, whatever the server sent
    if err.code == grpc.StatusCode.UNAVAILABLE:
        message = f"cannot reach a tlserve server at {address}: {message}"
    return f"tlserve: error: {err.code.name}: {message}"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = _split_passthrough(argv)
    if passthrough is not None:
        command, rest = passthrough
        return serve(rest) if command == "serve" else make_token(rest)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # usage errors (2) and --help (0)
        return exit_.code if isinstance(exit_.code, int) else 2
    if args.command == "serve":  # only reached through odd spellings _split_passthrough misses
        return serve(args.server_args)
    if args.command == "token":
        return make_token(args.token_args)
    try:
        with connect(args) as tl:
            return args.func(tl, args)
    except TLServeError as err:
        print(error_line(err, args.address), file=sys.stderr)
        return 1
    except BrokenPipeError:  # `tlserve ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, ValueError) as err:  # a local file that can't be read, a bad archive name
        print(f"tlserve: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tlserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
