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


CHIP_PROBE = """<!doctype html><html><body><pre id="out">pending</pre>
<iframe id="page" src="{src}" style="width:1200px;height:900px"></iframe>
<script>
document.getElementById("page").addEventListener("load", () => {{
  const doc = document.getElementById("page").contentDocument;
  const win = document.getElementById("page").contentWindow;
  const shown = () => Array.from(doc.querySelectorAll("img.heat")).filter(
    img => win.getComputedStyle(img).display !== "none").map(img => img.className);
  const before = shown();
  doc.querySelector('label[for="words-0-1"]').click();
  const after = shown();
  const first = doc.querySelector("li.hit img.heat.w1");
  const box = first.getBoundingClientRect();
  document.getElementById("out").textContent = JSON.stringify({{
    before: before, after: after, hits: doc.querySelectorAll("li.hit").length,
    word: doc.querySelector('label[for="words-0-1"]').textContent,
    width: box.width, height: box.height,
  }});
}});
</script></body></html>
"""


def test_choosing_a_word_shows_its_heat_map_on_every_hit(app, tmp_path: Path) -> None:
    """The page runs no script of its own: a click on a word chip (a label of a radio button)
    shows that word's overlay, by CSS alone, on every thumbnail and hides the others."""
    import json as _json
    import re as _re
    import subprocess
    from html import unescape

    import uvicorn
    from fastapi.responses import HTMLResponse

    from crossrank.serve import create_app

    from .._browser import chromium_args

    served = create_app(app.state.index, reranker="maxsim")
    page_url = "/?" + urlencode({"q": "a red circle left of a blue square", "k": 4})

    @served.get("/probe", response_class=HTMLResponse, include_in_schema=False)
    def _probe() -> str:
        return CHIP_PROBE.format(src=page_url)

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
        out = subprocess.run(
            [
                *chromium_args(tmp_path / "chromium"),
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"http://127.0.0.1:{port}/probe",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    m = _re.search(r'<pre id="out">(.*?)</pre>', out.stdout, _re.S)
    assert m is not None and m.group(1) != "pending", out.stderr[-2000:]
    found = _json.loads(unescape(m.group(1)))
    assert found["hits"] == 4
    assert found["before"] == []  # no map until a word is chosen
    assert found["after"] == ["heat w1"] * 4  # the chosen word's map, on every hit
    assert found["word"] == "red"
    assert found["width"] > 100 and found["height"] > 100  # laid over the whole frame
