"""``scaler-wizard cockpit [RUNS_DIR]``: the typer command function (registered by cli.py with
``app.command()(cockpit)``). FastAPI and uvicorn are the optional ``cockpit`` extra, imported only
when the command runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError


def cockpit(
    runs_dir: Annotated[Path, typer.Argument(help="folder holding the run directories")] = Path("runs"),
    host: Annotated[str, typer.Option(help="interface to bind; keep the loopback default unless you must")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port; 0 picks a free one")] = 0,
    allowed_host: Annotated[list[str] | None, typer.Option(
        "--allowed-host", help="host name clients use (Host header allowlist); repeatable")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="open the URL in a browser")] = False,
) -> None:
    """Serve the live cockpit for the runs in RUNS_DIR; prints a URL with a one-time access token."""
    try:
        from .server import serve
    except ImportError as exc:  # fastapi / uvicorn missing
        raise InputError(f"The cockpit needs the 'cockpit' extra ({exc.name} is not installed).",
                         hint="pip install 'scaler-wizard[cockpit]'") from None
    from ..cache.cache_cli import cockpit_rollback_handler

    serve(runs_dir, host=host, port=port, allowed_hosts=allowed_host or None, open_browser=open_browser,
          echo=typer.echo, rollback_handler=cockpit_rollback_handler(runs_dir))
