"""The default receiver of Flywheel's Alertmanager: a webhook that writes one line per alert to
stdout, so that alerts reach somewhere out of the box (``docker compose logs alert-log``,
``kubectl -n flywheel logs deploy/flywheel-alert-log``) before a real one is configured.

    python -m flywheel.app.alert_log --port 9095

Alertmanager POSTs its webhook payload (version 4: ``{"status", "alerts": [{"status", "labels",
"annotations", "startsAt", ...}], ...}``) to any path; each alert becomes
``FIRING FlywheelPolicyRolledBack severity=warning instance=... summary``. Replace it with your
pager, chat or ticket webhook in ``deploy/alertmanager/alertmanager.yml`` (see the README).
"""

from __future__ import annotations

import argparse
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from flywheel.app.tables import plain_text

MAX_PAYLOAD_BYTES = 1024 * 1024


def alert_lines(payload: dict) -> list[str]:
    """One line per alert of an Alertmanager webhook payload."""
    lines = []
    for alert in payload.get("alerts", []):
        labels, annotations = alert.get("labels", {}), alert.get("annotations", {})
        context = " ".join(f"{name}={labels[name]}" for name in ("severity", "instance", "job") if name in labels)
        lines.append(f"{alert.get('status', '?').upper()} {labels.get('alertname', '?')} {context} "
                     f"{annotations.get('summary', '')}".rstrip())
    return lines


class AlertLogHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_PAYLOAD_BYTES:
            self.send_error(413 if length else 411)
            return
        try:
            payload = json.loads(self.rfile.read(length))
        except ValueError:
            self.send_error(400, "not JSON")
            return
        for line in alert_lines(payload if isinstance(payload, dict) else {}):
            print(line, flush=True)
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802: a probe
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, format, *args) -> None:  # the alerts are the log; not every request
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flywheel.app.alert_log",
                                     description=plain_text(__doc__.split("\n\n")[0]))
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=9095, help="port to listen on (default 9095)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), AlertLogHandler)
    print(f"alert log: Alertmanager webhook on {args.host}:{server.server_port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
