"""Headless Chromium for the result-page tests: load a page, report each image as decoded.

The page is loaded into an iframe of a probe page served from the same origin, and the probe's own
script reads the frame's images (after ``img.decode()``) into its DOM, which ``--dump-dom`` prints.
The page under test is served exactly as written (its Content-Security-Policy forbids scripts).
"""

from __future__ import annotations

import functools
import html
import http.server
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HAVE_CHROMIUM = Path(CHROMIUM).is_file()

PROBE = """<!doctype html><html><body><pre id="out">pending</pre>
<iframe id="page" src="{src}" style="width:1200px;height:900px"></iframe>
<script>
document.getElementById("page").addEventListener("load", async () => {{
  const doc = document.getElementById("page").contentDocument;
  const images = Array.from(doc.images);
  await Promise.all(images.map(img => img.decode().catch(() => null)));
  document.getElementById("out").textContent = JSON.stringify({{
    title: doc.title,
    hits: doc.querySelectorAll("li.hit").length,
    images: images.map(img => ({{src: img.src.slice(0, 48), width: img.naturalWidth,
                                 height: img.naturalHeight, complete: img.complete}})),
  }});
}});
</script></body></html>
"""


def chromium_args(user_data_dir: Path) -> list[str]:
    return [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--no-default-browser-check",
        "--mute-audio",
        f"--user-data-dir={user_data_dir}",
    ]


def probe(probe_url: str, user_data_dir: Path, timeout: float = 60.0) -> dict:
    """Open ``probe_url`` (a page made from :data:`PROBE`) and return what its script found."""
    out = subprocess.run(
        [*chromium_args(user_data_dir), "--virtual-time-budget=10000", "--dump-dom", probe_url],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    m = re.search(r'<pre id="out">(.*?)</pre>', out.stdout, re.S)
    assert m is not None, (
        f"chromium printed no probe result: rc={out.returncode} {out.stderr[-2000:]}"
    )
    text = html.unescape(m.group(1))
    assert text != "pending", f"the page did not load in time: {out.stderr[-2000:]}"
    return json.loads(text)


@contextmanager
def static_server(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass
