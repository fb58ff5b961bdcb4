"""`lowvram`: serve, manage keys, and plan an engine without starting it."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from app.settings import Settings


def _serve(args: argparse.Namespace) -> int:
    import uvicorn
    from sse_starlette.sse import AppStatus

    from app.keystore import KeyStore
    from app.logs import configure_logging
    from app.main import create_app

    overrides = {
        "engine_model": args.model,
        "engine_vram": args.vram,
        "engine_context": args.context,
        "engine_concurrency": args.concurrency,
        "engine_backend": args.backend,
        "gateway_host": args.host,
        "gateway_port": args.port,
        "gateway_upstream_url": args.upstream,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.gateway_log_level)
    # Let in-flight streams finish on SIGTERM; uvicorn's graceful timeout bounds the wait.
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
    app = create_app(settings)
    _banner(settings, KeyStore(settings.gateway_db_path))
    config = uvicorn.Config(
        app,
        host=settings.gateway_host,
        port=settings.gateway_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.gateway_drain_seconds) or None,
        server_header=False,
    )
    uvicorn.Server(config).run()
    return 0


def _banner(settings: Settings, store: Any) -> None:
    host = "127.0.0.1" if settings.gateway_host in ("0.0.0.0", "::") else settings.gateway_host
    print(f"lowvram gateway: http://{host}:{settings.gateway_port}/v1", flush=True)
    if not settings.gateway_api_keys and not store.listing():
        print(
            "No API key yet. Make one (shown once):  .venv/bin/lowvram keys create my-app\n"
            "or start with GATEWAY_API_KEYS=<a long secret> in the environment or .env.",
            flush=True,
        )
    store.close()


def _keys(args: argparse.Namespace) -> int:
    from app.keystore import KeyStore

    store = KeyStore(Settings().gateway_db_path)
    try:
        if args.action == "create":
            try:
                key = store.create(
                    args.name,
                    models=args.models.split(",") if args.models else None,
                    rpm=args.rpm,
                    tpm=args.tpm,
                    max_concurrency=args.concurrency,
                )
            except ValueError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            if not args.quiet:
                print(
                    f"Created key '{args.name}'. It is shown once; store it now:", file=sys.stderr
                )
            print(key)
        elif args.action == "list":
            print(
                f"{'name':20} {'prefix':10} {'models':24} {'rpm':>6} {'tpm':>8} {'conc':>4} "
                f"{'requests':>8} {'tokens':>9} created"
            )
            for item in store.listing():
                rec = item.record
                created = time.strftime("%Y-%m-%d %H:%M", time.localtime(item.created_at))
                state = " (revoked)" if item.revoked_at else ""
                print(
                    f"{rec.name:20} {item.prefix:10} {','.join(rec.models or ['*']):24} "
                    f"{rec.rpm or '-':>6} {rec.tpm or '-':>8} {rec.max_concurrency or '-':>4} "
                    f"{item.requests:>8} {item.tokens:>9} {created}{state}"
                )
        elif args.action == "revoke":
            if not store.revoke(args.name):
                print(f"error: no active key named '{args.name}'", file=sys.stderr)
                return 1
            print(f"Revoked '{args.name}'.")
    finally:
        store.close()
    return 0


def _plan(args: argparse.Namespace) -> int:
    from engine.cli import run_plan

    return run_plan(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowvram", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway (and the engine it manages)")
    serve.add_argument("--model", help="model to serve (default: the backend's default)")
    serve.add_argument("--vram", help="VRAM budget for the engine, e.g. 6GiB")
    serve.add_argument("--context", type=int, help="context length to plan for")
    serve.add_argument("--concurrency", type=int, help="concurrent sequences to plan for")
    serve.add_argument("--backend", choices=["auto", "vllm", "llamacpp"])
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--upstream", help="front this OpenAI-compatible server instead")
    serve.set_defaults(func=_serve)

    keys = commands.add_parser("keys", help="manage API keys in the SQLite database")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("name")
    create.add_argument("--models", help="comma-separated model names this key may use")
    create.add_argument("--rpm", type=int, help="requests per minute")
    create.add_argument("--tpm", type=int, help="tokens per minute")
    create.add_argument("--concurrency", type=int, help="requests in flight at once")
    create.add_argument("--quiet", action="store_true", help="print only the key")
    actions.add_parser("list", help="list keys (never the keys themselves) and their usage")
    revoke = actions.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("name")
    keys.set_defaults(func=_keys)

    from engine.cli import add_plan_arguments

    plan = commands.add_parser("plan", help="print the engine plan for a model and a budget")
    add_plan_arguments(plan)
    plan.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
