"""The server's result page in headless Chromium: every hit's image is fetched and decoded."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

import pytest

from .._browser import HAVE_CHROMIUM, PROBE, probe

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not HAVE_CHROMIUM, reason="needs Debian's chromium (apt-get install chromium)"
    ),
]


def test_server_page_renders_every_hit_image_in_chromium(app, tmp_path: Path) -> None:
    import uvicorn
    from fastapi.responses import HTMLResponse

    from crossrank.serve import create_app

    served = create_app(app.state.index)
    page_url = "/?" + urlencode(
        {"q": "a red circle left of a blue square", "k": 7, "filters": '{"width": {"ge": 1}}'}
    )

    @served.get("/probe", response_class=HTMLResponse, include_in_schema=False)
    def _probe() -> str:  # same origin as the page, so its script may read the page's images
        return PROBE.format(src=page_url)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(served, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        port = sock.getsockname()[1]
        found = probe(f"http://127.0.0.1:{port}/probe", tmp_path / "chromium")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert found["hits"] == 7
    assert len(found["images"]) == 7
    for image in found["images"]:
        assert image["src"].startswith(f"http://127.0.0.1:{port}/thumbnails/")
        assert image["complete"] and image["width"] == 40 and image["height"] == 32, image
