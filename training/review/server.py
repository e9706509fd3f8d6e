"""``pellucid review``: serve a review page for one model on 127.0.0.1 (the standard library's HTTP server).

``pellucid review --ckpt <checkpoint.ckpt | zoo name | bundle folder> --data <data or experiment yaml> --port N
[--split test] [--corrections corrections.yaml] [--limit N] [--data-arg key=value ...]`` serves

- ``GET /``: the page (``page.html``: one static file, vanilla JavaScript, nothing loaded from elsewhere);
- ``GET /api/info``: the model, data, classes, concept controls, prototype count, corrections file;
- ``GET /api/samples?offset=0&count=20``: a page of the split with each sample's prediction;
- ``POST /api/predict`` ``{"index": i, "interventions": {"concept": value}}``: one sample predicted and explained;
- ``GET /api/prototypes`` and ``GET /api/prototype/<p>.png``: the prototypes, marks and source patches;
- ``POST /api/mark`` ``{"prototype": p, "mark": "forbid" | "keep" | null, "note": ""}``: mark a prototype's source
  patch and write the file;
- ``POST /api/mark_activation`` ``{"index": i, "prototype": p, "mark": ..., "note": ""}``: mark the patch of sample
  ``i`` where prototype ``p`` activates most (``--split train`` only) and write the file;
- ``GET /api/corrections``: the corrections as written.

It listens on 127.0.0.1 only. Every request is checked (:class:`~pellucid.training.review.session.ReviewSession`);
a bad one gets HTTP 400 with ``{"error": "<one line>"}``, never a traceback page. Requests whose ``Host`` is not the
loopback address are refused (a web page elsewhere cannot reach the server through DNS rebinding), and a ``POST`` must
be ``application/json`` (so a cross-site form cannot post without the browser's CORS check).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import traceback
from collections.abc import Sequence
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pellucid.training.review.session import ReviewError, ReviewSession, open_session

HOST = "127.0.0.1"
MAX_BODY = 64 * 1024
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
POST_FIELDS = {"/api/predict": {"index", "interventions"}, "/api/mark": {"prototype", "mark", "note"},
               "/api/mark_activation": {"index", "prototype", "mark", "note"}}  # endpoint -> the body's fields


def page_html() -> bytes:
    """The static page (package data ``page.html``)."""
    return resources.files("pellucid.training.review").joinpath("page.html").read_bytes()


class ReviewServer(ThreadingHTTPServer):
    """A threading HTTP server bound to 127.0.0.1 that serves one :class:`ReviewSession`.

    Args:
        session: What to serve.
        port: TCP port; 0 picks a free one (read it from :attr:`port`).
        quiet: Log nothing per request (errors of the server itself are still printed).
    """

    daemon_threads = True

    def __init__(self, session: ReviewSession, port: int = 0, quiet: bool = False) -> None:
        self.session, self.quiet = session, quiet
        self.page = page_html()
        super().__init__((HOST, port), ReviewHandler)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server_address[1])

    @property
    def url(self) -> str:
        """The page's address."""
        return f"http://{HOST}:{self.port}/"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread (tests, scripts); stop with ``shutdown()`` then ``server_close()``."""
        thread = threading.Thread(target=self.serve_forever, name="pellucid-review", daemon=True)
        thread.start()
        return thread


class ReviewHandler(BaseHTTPRequestHandler):
    """Routes the page's requests to the session; every answer is JSON, a PNG or the page."""

    server: ReviewServer
    server_version = "pellucid-review"
    error_content_type = "application/json"
    error_message_format = '{"error": "%(code)d %(message)s"}'

    # ------------------------------------------------------------------------------------------- answers
    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                         "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'; connect-src 'self'")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value: Any, status: int = HTTPStatus.OK) -> None:
        self._send(status, json.dumps(value, allow_nan=False).encode("utf-8"), "application/json")

    def _error(self, status: int, message: str) -> None:
        self._json({"error": " ".join(message.split())}, status)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        """One line per request on stderr, unless the server is quiet."""
        if not self.server.quiet:
            sys.stderr.write(f"review: {self.address_string()} {format % args}\n")

    # ------------------------------------------------------------------------------------------- routing
    def _allowed_host(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        return host in LOOPBACK_NAMES

    def _handle(self, route: Any) -> None:
        if not self._allowed_host():
            self._error(HTTPStatus.FORBIDDEN, f"Host {self.headers.get('Host')!r} refused: open the page at "
                        f"{self.server.url}")
            return
        try:
            route()
        except ReviewError as error:
            self._error(HTTPStatus.BAD_REQUEST, str(error))
        except Exception as error:  # noqa: BLE001 - answered as JSON and printed with its traceback, never hidden
            traceback.print_exc(file=sys.stderr)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(error).__name__}: {error}); "
                        "the traceback is in the server's terminal")

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        """Serve the page, JSON and PNGs."""
        self._handle(self._get)

    def do_HEAD(self) -> None:  # noqa: N802 - the base class's name
        """As GET, without the body."""
        self._handle(self._get)

    def do_POST(self) -> None:  # noqa: N802 - the base class's name
        """Predict with interventions; mark prototypes' source patches and patches where they activate."""
        self._handle(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        session, path = self.server.session, url.path
        if path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, self.server.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(session.info())
        elif path == "/api/samples":
            query = parse_qs(url.query)
            self._json(session.samples(_integer(query, "offset", 0), _integer(query, "count", 20)))
        elif path == "/api/prototypes":
            self._json(session.prototypes())
        elif path.startswith("/api/prototype/") and path.endswith(".png"):
            number = path[len("/api/prototype/"):-len(".png")]
            if not number.isdigit():
                raise ReviewError(f"prototype: expected /api/prototype/<index>.png, got {path!r}")
            self._send(HTTPStatus.OK, session.prototype_png(int(number)), "image/png")
        elif path == "/api/corrections":
            self._json(session.corrections_state())
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such page: {path!r}")

    def _post(self) -> None:
        path, session = urlsplit(self.path).path, self.server.session
        if path not in POST_FIELDS:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {path!r}")
            return
        body = self._body()
        _only(body, POST_FIELDS[path])
        if path == "/api/predict":
            self._json(session.predict(body.get("index"), body.get("interventions")))
            return
        if "mark" not in body:
            raise ReviewError("mark: expected 'forbid', 'keep' or null (clear), got no mark")
        if path == "/api/mark":
            self._json(session.mark(body.get("prototype"), body["mark"], body.get("note", "")))
        else:
            self._json(session.mark_activation(body.get("index"), body.get("prototype"), body["mark"],
                                               body.get("note", "")))

    def _body(self) -> dict[str, Any]:
        content_type = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        if content_type != "application/json":
            raise ReviewError(f"request body: expected Content-Type application/json, got {content_type!r}")
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY:
            raise ReviewError(f"request body: expected a Content-Length up to {MAX_BODY} bytes, got {length!r}")
        try:
            body = json.loads(self.rfile.read(int(length)).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ReviewError(f"request body: expected a JSON object, got invalid JSON ({error})") from None
        if not isinstance(body, dict):
            raise ReviewError(f"request body: expected a JSON object, got {type(body).__name__}")
        return body


def _integer(query: dict[str, list[str]], name: str, default: int) -> int:
    values = query.get(name)
    if not values:
        return default
    text = values[-1]
    if not text.lstrip("-").isdigit():
        raise ReviewError(f"{name}: expected an integer, got {text!r}")
    return int(text)


def _only(body: dict[str, Any], keys: set[str]) -> None:
    unknown = sorted(set(body) - keys)
    if unknown:
        raise ReviewError(f"request body: unknown field(s) {unknown}; expected {sorted(keys)}")


# ------------------------------------------------------------------------------------------------ command
def _overrides(pairs: Sequence[str]) -> dict[str, Any]:
    from pellucid.training.outputs.report import _overrides as parse  # the report's --data-arg, one parser

    return parse(pairs)


def review_main(argv: Sequence[str]) -> None:
    """``pellucid review`` (see the module docstring): serve until interrupted."""
    parser = argparse.ArgumentParser(prog="pellucid review", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint file (.ckpt), zoo name or bundle folder")
    parser.add_argument("--data", required=True, help="data (or experiment) config YAML with a data: section")
    parser.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"])
    parser.add_argument("--corrections", default="corrections.yaml",
                        help="prototype corrections file written on every mark (an existing one is continued)")
    parser.add_argument("--limit", type=int, help="review only the first N samples of the split")
    parser.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override one init_args entry of the data config (repeatable)")
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, ...)")
    parser.add_argument("--quiet", action="store_true", help="no line per request")
    args = parser.parse_args(list(argv))
    if not 0 <= args.port <= 65535:
        parser.error(f"--port: expected 0..65535, got {args.port}")
    try:
        session = open_session(args.ckpt, args.data, args.corrections, split=args.split,
                               data_overrides=_overrides(args.data_arg), limit=args.limit, device=args.device)
    except ReviewError as error:
        parser.exit(1, f"pellucid review: error: {error}\n")
    try:
        server = ReviewServer(session, args.port, quiet=args.quiet)
    except OSError as error:
        parser.exit(1, f"pellucid review: error: cannot listen on {HOST}:{args.port} ({error.strerror}); "
                       "choose another --port\n")
    print(f"pellucid review: {session.model.name} on {session.count} {args.split} samples at {server.url}\n"
          f"corrections are written to {session.corrections_path}; stop with Ctrl-C", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("pellucid review: stopped")
    finally:
        server.server_close()
