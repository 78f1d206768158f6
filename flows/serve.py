"""``labelrefinery serve``: browse the static reports of a dataset root over HTTP, read-only.

Only report files are reachable: ``reports/…`` (the index across versions), ``versions/<id>/report/…`` and
``versions/<id>/metrics.json``. Every request path is decoded once, split, and refused when a segment is
``..``, hidden (``.draft-…``, ``.prefect``) or the resolved file lies outside the root (symlinks), so
``..%2f`` and absolute-path tricks get a 404 and no artifact or input file can be read. GET and HEAD only,
no directory listings, bound to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import functools
import sys
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import typer

DEFAULT_CATALOG = Path(__file__).resolve().parents[1] / "data_catalog.yaml"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'none'"
    ),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def allowed(parts: tuple[str, ...]) -> bool:
    """Whether a root-relative path (split into segments) is part of a report."""
    if not parts:
        return False
    if parts[0] == "reports":
        return True
    if parts[0] == "versions" and len(parts) >= 3:
        return parts[2] == "report" or (len(parts) == 3 and parts[2] == "metrics.json")
    return False


def resolve_request(root: Path, raw_path: str) -> Path | None:
    """The file a request path names, or None when it is not a report file inside ``root``."""
    path = unquote(urlsplit(raw_path).path, errors="strict")
    if "\x00" in path or "\\" in path:
        return None
    parts = tuple(p for p in path.split("/") if p)
    if any(p in (".", "..") or p.startswith(".") for p in parts) or not allowed(parts):
        return None
    target = root.joinpath(*parts).resolve()
    if target != root and root not in target.parents:
        return None
    rel = target.relative_to(root).parts
    return target if allowed(rel) else None


class ReportHandler(SimpleHTTPRequestHandler):
    """Static files of the report root; everything else is a 404, every other method a 405."""

    server_version = "labelrefinery-report/1"
    sys_version = ""

    def __init__(self, *args, root: Path, quiet: bool = True, **kwargs):
        self.root = root
        self.quiet = quiet
        super().__init__(*args, directory=str(root), **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if urlsplit(self.path).path in ("", "/"):
            self._redirect("/reports/index.html")
            return
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        if urlsplit(self.path).path in ("", "/"):
            self._redirect("/reports/index.html")
            return
        super().do_HEAD()

    def _refuse(self) -> None:
        self.send_error(HTTPStatus.METHOD_NOT_ALLOWED, "read-only: GET and HEAD only")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse  # noqa: N815

    def _redirect(self, where: str) -> None:
        self.send_response(HTTPStatus.FOUND)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _target(self, path: str) -> Path | None:
        try:
            return resolve_request(self.root, path)
        except UnicodeDecodeError:
            return None

    def send_head(self):
        if self._target(self.path) is None:
            self.send_error(HTTPStatus.NOT_FOUND, "not a report file")
            return None
        return super().send_head()

    def translate_path(self, path: str) -> str:
        target = self._target(path)
        return str(target) if target is not None else str(self.root / ".refused")

    def list_directory(self, path):
        self.send_error(HTTPStatus.NOT_FOUND, "no directory listings")
        return None

    def end_headers(self) -> None:
        for k, v in SECURITY_HEADERS.items():
            self.send_header(k, v)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        if not self.quiet:
            super().log_message(format, *args)


class ReportServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(
    root: str | Path, host: str = "127.0.0.1", port: int = 8765, quiet: bool = True
) -> ReportServer:
    """A server for the reports under dataset ``root`` (``port=0`` picks a free port)."""
    root = Path(root).resolve()
    handler = functools.partial(ReportHandler, root=root, quiet=quiet)
    return ReportServer((host, port), handler)


def serve(
    port: int = typer.Option(8765, "--port", "-p", help="TCP port (0 = any free port)."),
    host: str = typer.Option("127.0.0.1", help="Interface to bind; keep 127.0.0.1 unless you mean to share."),
    catalog: Path = typer.Option(DEFAULT_CATALOG, "--catalog", "-c", help="Path to a data_catalog.yaml."),  # noqa: B008
    verbose: bool = typer.Option(False, "--verbose", help="Log every request."),
) -> None:
    """Serve the dataset's reports read-only over HTTP (Ctrl-C stops)."""
    from schemas.catalog import CatalogError, load_catalog

    try:
        root = load_catalog(catalog).root_path
    except CatalogError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not (root / "reports" / "index.html").is_file():
        typer.echo(
            f"warning: {root / 'reports' / 'index.html'} does not exist yet; run a refresh first", err=True
        )
    server = make_server(root, host, port, quiet=not verbose)
    h, p = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}, reachable from other machines", err=True)
    shown = f"[{h}]" if ":" in str(h) else h
    typer.echo(f"serving {root} (reports only) at http://{shown}:{p}/reports/index.html")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    sys.stdout.flush()
