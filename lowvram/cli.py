"""`lowvram`: serve, manage keys, and plan an engine without starting it.

    lowvram serve [--model M] [--vram 6GiB] ...    the gateway and the engine it manages
    lowvram keys create|list|revoke                API keys in the SQLite database
    lowvram plan MODEL --vram 6GiB [...]           the vLLM plan, without a GPU
    lowvram build                                  build llama.cpp's server now (once)

Every `--flag` but the key commands' is a setting: a field of `GatewaySettings` or
`EngineSettings`, whose docstring is its help. A flag, its environment variable and `.env`
mean the same thing; the flag wins. A mistake the user can fix prints one line,
`error: ...`, and exits 2: no traceback, no banner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, get_args
from urllib.parse import urlsplit

from pydantic import ValidationError
from pydantic_settings import BaseSettings, SettingsError

from lowvram.engine.errors import EngineError, PlanError

if TYPE_CHECKING:
    from lowvram.engine.hardware import Hardware
from lowvram.engine.handle import EngineHandle
from lowvram.engine.replicas import Replicas
from lowvram.engine.settings import EngineSettings
from lowvram.gateway.settings import GatewaySettings

S = TypeVar("S", bound=BaseSettings)

Flags = dict[str, tuple[type[BaseSettings], str]]

SERVE_FLAGS: Flags = {
    "--model": (EngineSettings, "model"),
    "--models": (EngineSettings, "models"),
    "--vram": (EngineSettings, "vram"),
    "--context": (EngineSettings, "context"),
    "--concurrency": (EngineSettings, "concurrency"),
    "--gpus": (EngineSettings, "gpus"),
    "--replicas": (EngineSettings, "replicas"),
    "--backend": (EngineSettings, "backend"),
    "--optimize": (EngineSettings, "optimize"),
    "--host": (GatewaySettings, "host"),
    "--port": (GatewaySettings, "port"),
    "--upstream": (GatewaySettings, "upstream_url"),
}
PLAN_FLAGS: Flags = {
    "--vram": (EngineSettings, "vram"),
    "--context": (EngineSettings, "context"),
    "--concurrency": (EngineSettings, "concurrency"),
    "--gpus": (EngineSettings, "gpus"),
    "--replicas": (EngineSettings, "replicas"),
    "--gpu-memory": (EngineSettings, "gpu_memory"),
    "--host-memory": (EngineSettings, "host_memory"),
    "--pcie-bandwidth": (EngineSettings, "pcie_bandwidth"),
    "--optimize": (EngineSettings, "optimize"),
    "--quantization": (EngineSettings, "quantization"),
    "--offload-vocab": (EngineSettings, "offload_vocab"),
}


class UsageError(Exception):
    """A mistake the user can fix: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """A mistaken command line is one line too, naming the flag (not the whole usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


# --- settings from flags -----------------------------------------------------------------


def add_setting_flags(parser: argparse.ArgumentParser, flags: Flags) -> None:
    """One flag per settings field; type checks are the settings' own, help its docstring."""
    for flag, (cls, name) in flags.items():
        field = cls.model_fields[name]
        choices = [a for a in get_args(field.annotation) if isinstance(a, str)] or None
        parser.add_argument(
            flag,
            dest=_dest(cls, name),
            help=(field.description or "").replace("%", "%%"),  # argparse formats help with %
            choices=choices,
            metavar=None if choices else name.upper(),
        )


def settings_from(cls: type[S], args: argparse.Namespace, flags: Flags) -> S:
    """`cls` from the environment and `.env`, with the flags given on top."""
    overrides = {
        name: getattr(args, _dest(c, name))
        for c, name in flags.values()
        if c is cls and getattr(args, _dest(c, name), None) is not None
    }
    return load_settings(cls, **overrides)


def load_settings(cls: type[S], **overrides: Any) -> S:
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise UsageError(describe_settings_error(cls, exc)) from None
    except SettingsError as exc:
        raise UsageError(f"a setting could not be read: {exc}") from None


def describe_settings_error(cls: type[BaseSettings], exc: ValidationError) -> str:
    """`GATEWAY_PORT='abc': Input should be a valid integer, ...` for each bad setting;
    a secret's value (keys) is never repeated."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        message = error["msg"].removeprefix("Value error, ")
        if not field:  # a rule between settings: its message names them
            parts.append(message)
            continue
        name = (prefix + field).upper()
        value = error.get("input")
        secret = field in cls.model_fields and "SecretStr" in str(cls.model_fields[field])
        if isinstance(value, str):
            value = _USERINFO.sub("//***@", value)  # a password in a URL
        shown = f"={value!r}" if isinstance(value, (str, int, float)) and not secret else ""
        parts.append(f"{name}{shown}: {message}")
    return "; ".join(parts)


_USERINFO = re.compile(r"//[^/@\s]*@")


def _dest(cls: type[BaseSettings], name: str) -> str:
    return f"{cls.__name__}.{name}"


# --- serve -------------------------------------------------------------------------------


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lowvram.gateway.app import create_app
    from lowvram.gateway.connections import protocol_for
    from lowvram.logs import configure_logging

    gateway = settings_from(GatewaySettings, args, SERVE_FLAGS)
    engine_settings = settings_from(EngineSettings, args, SERVE_FLAGS)
    configure_logging(gateway.log_level, gateway.log_format)
    has_keys = _open_database(gateway.db_path)
    listener = listen(gateway.host, gateway.port)  # a taken port fails before the engine starts
    engine = build_engine(gateway, engine_settings)

    def banner() -> None:
        keys = has_keys or bool(gateway.api_keys) or gateway.allow_no_key
        print(_banner(gateway, engine, keys), flush=True)

    _QuietServer = _quiet_server_class()
    # On SIGTERM in-flight streams may finish for drain_seconds; then uvicorn cancels them,
    # and each ends with an error event (gateway/relay.py).
    config = uvicorn.Config(
        create_app(gateway, engine, on_ready=banner),
        host=gateway.host,
        port=gateway.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(gateway.drain_seconds) or None,
        server_header=False,
        http=protocol_for(gateway),  # header deadline, connection cap (connections.py)
    )
    _QuietServer(config).run(sockets=[listener])
    print("lowvram stopped.", file=sys.stderr, flush=True)
    return 0


def _quiet_server_class() -> type[Any]:
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn's server, less the Ctrl-C (or SIGTERM) it re-raises once it has stopped on
        it: that stop was clean, so exit 0, not a KeyboardInterrupt traceback."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            with super().capture_signals():
                yield
                getattr(self, "_captured_signals", []).clear()

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            await super().shutdown(sockets)
            if self.force_exit:
                # A second Ctrl-C: uvicorn stops waiting and skips the app's shutdown. Cut
                # what still runs (each stream ends with its error event), then shut the
                # app down all the same: its engines must not outlive it.
                tasks = list(self.server_state.tasks)
                for task in tasks:
                    task.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=5)
                await self.lifespan.shutdown()

    return QuietServer


def listen(host: str, port: int) -> socket.socket:
    """The gateway's socket, bound here so that a bad host or a taken port is one line
    naming the settings (uvicorn would log it as JSON and exit 3)."""
    where = f"{host}:{port} (GATEWAY_HOST, GATEWAY_PORT)"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as exc:
        raise UsageError(f"cannot listen on {where}: {_reason(exc)}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {where}: {_reason(exc)}") from None
    return sock


def _reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def build_engine(gateway: GatewaySettings, engine: EngineSettings) -> EngineHandle | Replicas:
    """The upstream named in the gateway's settings, or an engine we plan, start and watch."""
    if gateway.upstream_url:
        from lowvram.engine.external import ExternalEngine

        key = gateway.upstream_api_key
        upstreams = [
            ExternalEngine(
                url, key.get_secret_value() if key else None, context_length=gateway.context_length
            )
            for url in gateway.upstream_url
        ]
        if len(upstreams) == 1:
            return upstreams[0]
        return Replicas(upstreams, [_public_name(url) for url in gateway.upstream_url])
    from lowvram.engine.factory import build_engine as build_managed

    return build_managed(engine)


def _public_name(url: str) -> str:
    """host:port, for /ready and /metrics: never the user:password a URL may carry."""
    parts = urlsplit(url)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{host}:{parts.port}" if parts.port else str(host)


def _open_database(path: Path) -> bool:
    """Check the key database opens before anything starts; whether it holds a key."""
    store = _key_store(path)
    try:
        return any(item.revoked_at is None for item in store.listing())
    finally:
        store.close()


def _key_store(path: Path) -> Any:
    from lowvram.gateway.keystore import KeyStore

    try:
        return KeyStore(path)
    except (OSError, sqlite3.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UsageError(
            f"cannot open the key database {path}: {reason} "
            "(set GATEWAY_DB_PATH to a file in a writable directory)"
        ) from None


def _banner(settings: GatewaySettings, engine: EngineHandle | Replicas, has_keys: bool) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    names = [model.id for model in engine.models] or ["?"]
    served = f"model: {names[0]}" if len(names) == 1 else "models: " + ", ".join(names)
    lines = [
        f"lowvram is ready: http://{host}:{settings.port}/v1  ({served}; "
        f'"default" names {names[0]})',
        f"data: {settings.db_path.parent}  (keys and usage: {settings.db_path.name})",
    ]
    if not has_keys:
        lines.append(
            f"No API key yet. Make one, shown once:  {_program()} keys create my-app"
            "  (or set GATEWAY_API_KEYS)"
        )
    lines.append("Stop with Ctrl-C.")
    return "\n".join(lines)


def _program() -> str:
    """How the user ran us, to repeat in a hint: `.venv/bin/lowvram` or `lowvram`."""
    argv0 = Path(sys.argv[0])
    if argv0.name != "lowvram" or str(argv0.parent) in os.get_exec_path():
        return "lowvram"
    try:
        return str(argv0.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(argv0)


# --- keys --------------------------------------------------------------------------------


def keys(args: argparse.Namespace) -> int:
    store = _key_store(load_settings(GatewaySettings).db_path)
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
                raise UsageError(str(exc)) from None
            if not args.quiet:
                shown_once = f"Created key '{args.name}'. It is shown once; store it now:"
                print(shown_once, file=sys.stderr)
            print(key)
        elif args.action == "list":
            _print_keys(store)
        elif args.action == "revoke":
            if not store.revoke(args.name):
                raise UsageError(f"no active key named '{args.name}'")
            print(f"Revoked '{args.name}'.")
    finally:
        store.close()
    return 0


def _print_keys(store: Any) -> None:
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


# --- plan --------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> int:
    import json

    from lowvram.engine.hardware import detect_hardware
    from lowvram.engine.vllm.deployment import plan_deployment
    from lowvram.engine.vllm.environment import missing_plugin
    from lowvram.engine.vllm.model import load_model_facts

    settings = settings_from(EngineSettings, args, PLAN_FLAGS)
    if "=" in args.model:  # name=model,name2=model2: several models, one awake
        several = settings.model_dump(exclude_unset=True) | {"models": args.model}
        settings = load_settings(EngineSettings, **several)
    hardware = detect_hardware(settings)
    if hardware.gpu is None:
        raise PlanError("no NVIDIA GPU found here: pass --gpu-memory (e.g. 24GiB) to plan for one")
    missing = missing_plugin(settings.command)
    if settings.models:
        return _plan_several(settings, hardware, missing, as_json=args.json)
    deployment = plan_deployment(
        load_model_facts(args.model), hardware, settings, plugin_missing=missing
    )
    if args.json:
        result = deployment.plan
        extra = {
            "argv": result.to_argv(),
            "env": result.to_env(),
            "gpu_groups": deployment.groups,
            "tokens_per_s_in_all": round(deployment.tokens_per_s, 1),
            "deployment_reasons": deployment.reasons,
        }
        print(json.dumps(result.model_dump(mode="json") | extra, indent=2))
    else:
        print(deployment.explain())
    return 0


def _plan_several(
    settings: EngineSettings, hardware: Hardware, missing: str | None, *, as_json: bool
) -> int:
    """Every model's plan, each for the budget less the others asleep, and the sleep level."""
    import json

    from lowvram.engine.factory import vllm_models
    from lowvram.engine.vllm.backend import VllmBackend
    from lowvram.engine.vllm.several import explain_sleep, sleep_level
    from lowvram.engine.vllm.sleep import SLEEP_ENV, sleep_args

    backends, names = vllm_models(settings, hardware, missing)
    engines = [b for b in backends if isinstance(b, VllmBackend)]
    level = settings.sleep_level or sleep_level([b.plan for b in engines], hardware)
    if as_json:
        plans = {
            name: b.plan.model_dump(mode="json")
            | {"argv": [*b.plan.to_argv(), *sleep_args(name)], "env": b.plan.to_env() | SLEEP_ENV}
            for name, b in zip(names, engines, strict=True)
        }
        print(json.dumps({"models": plans, "sleep_level": level}, indent=2))
        return 0
    print(explain_sleep(level, len(names)))
    for name, backend in zip(names, engines, strict=True):
        print(f"\n{name}:\n" + backend.deployment.explain())
        print(f"  and: {' '.join(sleep_args(name))} VLLM_SERVER_DEV_MODE=1")
    return 0


# --- build ------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> int:
    """Build llama.cpp's server now, rather than on the first `serve` that needs it."""
    from lowvram.engine.llamacpp.build import ensure_server

    print(ensure_server().binary)
    return 0


# --- the parser --------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lowvram", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    serve_parser = commands.add_parser("serve", help="run the gateway (and the engine it manages)")
    add_setting_flags(serve_parser, SERVE_FLAGS)
    serve_parser.set_defaults(func=serve)

    keys_parser = commands.add_parser("keys", help="manage API keys in the SQLite database")
    actions = keys_parser.add_subparsers(dest="action", required=True)
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
    keys_parser.set_defaults(func=keys)

    plan_parser = commands.add_parser("plan", help="print the engine plan for a model and a budget")
    plan_parser.add_argument(
        "model",
        help="HF directory (config.json is enough) or Hub id; name=model,name2=model2 plans "
        "several models on one GPU, one awake at a time",
    )
    add_setting_flags(plan_parser, PLAN_FLAGS)
    plan_parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan_parser.set_defaults(func=plan)

    build_parser_ = commands.add_parser(
        "build", help="build llama.cpp's server now (serve builds it when first needed)"
    )
    build_parser_.set_defaults(func=build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except (UsageError, EngineError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
