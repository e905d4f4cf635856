"""sc2deploy complete: ask a running `sc2deploy serve` for a completion."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sc2deploy.commands.common import notice, positive_int
from sc2deploy.errors import UserError
from sc2deploy.tokenizer import validate_text

API_KEY_ENV = "SC2DEPLOY_API_KEY"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "complete", help="ask a running server for a completion (the gRPC client)",
        description="Send PROMPT to a `sc2deploy serve` server and print the completion. With --suffix the "
                    "server builds a fill-in-the-middle prompt (PROMPT is the code before the cursor). With "
                    "--stream the text is printed as it is generated. The finish reason and token counts go "
                    "to stderr. The API key comes from --api-key-file or the SC2DEPLOY_API_KEY variable. "
                    "--json prints finish_reason as length, eos, stop or cancelled, as `generate --json` does.",
        epilog="examples:\n"
               "  sc2deploy complete --server localhost:50051 'def fib(n):'\n"
               "  sc2deploy complete --server localhost:50051 --stream --suffix $'    return b\\n' \\\n"
               "      $'def fib(n):\\n    a, b = 0, 1\\n'    # fill in the middle; bash's $'...' makes \\n a newline\n"
               "  echo 'import os' | sc2deploy complete --server localhost:50051 --json -\n"
               "  sc2deploy complete --server localhost:50051 --info",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="code before the cursor; - reads it from stdin")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="address of the server")
    p.add_argument("--stream", action="store_true", help="print the text as it is generated (CompleteStream)")
    p.add_argument("--suffix", default="", metavar="S", help="code after the cursor: fill-in-the-middle")
    p.add_argument("--info", action="store_true", help="print the server's model info (GetModelInfo) and exit")
    s = p.add_argument_group("sampling")
    s.add_argument("--max-tokens", type=positive_int, metavar="N", help="tokens to generate at most (server default)")
    s.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    s.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling mass in (0, 1] (default 1)")
    s.add_argument("--top-k", type=int, default=0, metavar="K", help="sample among the K most likely (0 = all)")
    s.add_argument("--seed", type=int, metavar="N", help="sampling seed, for reproducible samples")
    s.add_argument("--stop", action="append", default=[], metavar="STR", help="stop before this string (repeatable)")
    s.add_argument("--logprobs", type=int, default=0, metavar="N", help="return the N most likely tokens per step")
    r = p.add_argument_group("repo-level context")
    r.add_argument("--repo-name", default="", metavar="NAME", help="repository name (needs --file-path)")
    r.add_argument("--file-path", default="", metavar="PATH", help="path of the file being completed")
    r.add_argument("--context-file", action="append", default=[], metavar="FILE",
                   help="another file of the repository to put before the current one (repeatable)")
    c = p.add_argument_group("connection")
    c.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    c.add_argument("--tls-ca", metavar="FILE", help="use TLS, trusting this PEM certificate (e.g. a self-signed one)")
    c.add_argument("--server-name", metavar="NAME", help="TLS name to check instead of the host in --server")
    c.add_argument("--api-key-file", metavar="FILE", help=f"file whose first line is the API key (or set {API_KEY_ENV})")
    c.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="deadline of the call (default 60)")
    p.add_argument("--json", action="store_true", help="print the response as JSON (one object per chunk with --stream)")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import grpc
        from google.protobuf.json_format import MessageToDict
    except ImportError as e:
        raise UserError(f"the client needs the `serve` extra ({e.name} is missing): pip install 'sc2deploy[serve]'")
    from sc2deploy.serving.client import FINISH_NAMES, Client, describe_error, make_request

    client = Client(args.server, tls=args.tls, root_certificates=_read(args.tls_ca, "--tls-ca") if args.tls_ca else None,
                    api_key=_api_key(args), server_name=args.server_name)

    def as_dict(message) -> dict:
        """The message as JSON, with finish_reason's short name (length, eos, stop, cancelled) as in generate."""
        out = MessageToDict(message, preserving_proto_field_name=True)
        if "finish_reason" in out:
            out["finish_reason"] = FINISH_NAMES.get(message.finish_reason, out["finish_reason"])
        return out

    try:
        if args.info:
            info = client.info(timeout=args.timeout)
            print(json.dumps(as_dict(info), indent=2))
            return 0
        request = make_request(
            _prompt(args), validate_text(args.suffix, "--suffix"), max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, stop=[validate_text(x, '--stop') for x in args.stop], logprobs=args.logprobs, repo_name=args.repo_name,
            file_path=args.file_path, context_files=[(f, _read(f, "--context-file").decode("utf-8", "replace"))
                                                     for f in args.context_file])
        if args.stream:
            last = None
            for chunk in client.stream(request, timeout=args.timeout):
                if args.json:
                    print(json.dumps(as_dict(chunk)), flush=True)
                else:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                last = chunk
            summary = last
        else:
            summary = response = client.complete(request, timeout=args.timeout)
            if args.json:
                print(json.dumps(as_dict(response), indent=2))
            else:
                sys.stdout.write(response.text)
        if not args.json:
            sys.stdout.write("\n")
            if summary is not None:
                notice(f"[{FINISH_NAMES.get(summary.finish_reason, '?')}; {summary.usage.completion_tokens} tokens; "
                       f"prompt {summary.usage.prompt_tokens} tokens]")
    except grpc.RpcError as e:
        message, exit_code = describe_error(e, args.server)
        error = UserError(message)
        error.exit_code = exit_code
        raise error from None
    finally:
        client.close()
    return 0


def _prompt(args) -> str:
    if args.prompt is None:
        raise UserError("give a PROMPT (or - to read it from stdin), or --info")
    if args.prompt == "-":
        data = sys.stdin.buffer.read()
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"stdin is not valid UTF-8 (bad data at byte {e.start}); re-encode it") from None
    return validate_text(args.prompt, "PROMPT")


def _api_key(args) -> str | None:
    if args.api_key_file:
        from sc2deploy.serving.auth import read_api_keys

        return read_api_keys(args.api_key_file)[0]
    return os.environ.get(API_KEY_ENV) or None


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {flag} {path} ({e.strerror})") from None
