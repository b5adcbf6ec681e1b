"""The pages in a real headless Chromium, served by uvicorn on 127.0.0.1.

Needs the Debian package ``chromium`` (/usr/bin/chromium). Skipped when it is missing, unless
``CI`` is set: then its absence is a failure.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from cdc.devdb import LocalPostgres
from cdc.lsn import format_lsn
from cdc.web import create_app
from cdc.web.serve import bind_socket
from tests.integration.test_api import build_web_seed
from tests.integration.test_web_undo import CLEAR, UndoEnv, build_undo_env
from tests.store_builder import REQ_FAILED, REQ_INSERT, REQ_NAME, REQ_PLAN, StoreBuilder

CHROMIUM = "/usr/bin/chromium"
WIDTH, HEIGHT = 1280, 900
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{CHROMIUM} is missing (apt-get install chromium); CI is set, so this is a failure")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")


@pytest.fixture(scope="module")
def seed(pg: LocalPostgres) -> Iterator[StoreBuilder]:
    name = f"t_{uuid.uuid4().hex[:8]}"
    b = StoreBuilder(pg.create_database(name))
    build_web_seed(b)
    b.finish(baseline=0x1_0000_0000)
    yield b
    b.close()
    pg.drop_database(name)


@pytest.fixture(scope="module")
def base_url(seed: StoreBuilder) -> Iterator[str]:
    """The app served by uvicorn in a thread on 127.0.0.1 (open access: Chromium sends no token)."""
    yield from served(create_app(seed.dsn, open_access=True))


@pytest.fixture(scope="module")
def undo_url(pg: LocalPostgres) -> Iterator[tuple[str, UndoEnv]]:
    """Real capture with redacted columns (test_web_undo.py), served with its source: the previews."""
    for env in build_undo_env(pg):
        for url in served(env.app()):
            yield url, env


def served(app: Any) -> Iterator[str]:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


def run_chromium(chromium: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / f"profile-{uuid.uuid4().hex[:6]}"
    result = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    shutil.rmtree(profile, ignore_errors=True)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    return result


# ============================================================================ a tiny PNG reader


@dataclass(frozen=True)
class Image:
    width: int
    height: int
    channels: int
    rows: list[bytes]  # unfiltered scanlines

    def at(self, x: int, y: int) -> tuple[int, int, int]:
        row, i = self.rows[y], x * self.channels
        return row[i], row[i + 1], row[i + 2]

    def sample(self, step: int = 7) -> list[tuple[int, int, int]]:
        """Every ``step``-th pixel, row by row (RGB)."""
        c = self.channels
        return [(r[i], r[i + 1], r[i + 2]) for r in self.rows for i in range(0, self.width * c, step * c)]


def read_png(data: bytes) -> Image:
    """Decode an 8-bit, non-interlaced RGB or RGBA PNG (what Chromium writes): zlib + unfiltering."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert header is not None
    width, height, depth, color, _, _, interlace = header
    assert depth == 8 and color in (2, 6) and interlace == 0, header
    c = 3 if color == 2 else 4
    stride = width * c
    raw = zlib.decompress(idat)
    assert len(raw) == height * (stride + 1)
    rows: list[bytes] = []
    prev = bytes(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        cur = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        if kind == 1:  # Sub
            for i in range(c, stride):
                cur[i] = (cur[i] + cur[i - c]) & 0xFF
        elif kind == 2:  # Up
            cur = bytearray((a + b) & 0xFF for a, b in zip(cur, prev, strict=True))
        elif kind == 3:  # Average
            for i in range(stride):
                cur[i] = (cur[i] + ((cur[i - c] if i >= c else 0) + prev[i]) // 2) & 0xFF
        elif kind == 4:  # Paeth
            for i in range(stride):
                a = cur[i - c] if i >= c else 0
                b = prev[i]
                d = prev[i - c] if i >= c else 0
                pa, pb, pc = abs(b - d), abs(a - d), abs(a + b - 2 * d)
                cur[i] = (cur[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else d)) & 0xFF
        rows.append(bytes(cur))
        prev = rows[-1]
    return Image(width, height, c, rows)


def screenshot(chromium: str, tmp_path: Path, url: str, name: str) -> Image:
    target = tmp_path / name
    run_chromium(chromium, tmp_path, f"--screenshot={target}", f"--window-size={WIDTH},{HEIGHT}", url)
    assert target.is_file() and target.stat().st_size > 1000, target
    return read_png(target.read_bytes())


def assert_not_blank(image: Image) -> None:
    assert (image.width, image.height) == (WIDTH, HEIGHT)
    pixels = image.sample(3)
    white = sum(1 for p in pixels if p == (255, 255, 255))
    assert 0.2 < white / len(pixels) < 0.97, white / len(pixels)  # a page, not a void
    grey = [sum(p) / 3 for p in pixels]
    mean = sum(grey) / len(grey)
    variance = sum((g - mean) ** 2 for g in grey) / len(grey)
    assert variance > 300, variance
    assert len(set(pixels)) > 50  # text, badges, highlights: many shades
    # The stylesheet was applied (the CSP allows it): a dark header bar across the top.
    for x in (5, WIDTH // 2, WIDTH - 40):  # (a scrollbar may take the right edge)
        assert max(image.at(x, 8)) < 80, image.at(x, 8)
    assert image.at(WIDTH // 2, HEIGHT - 5) != image.at(5, 8)


# ============================================================================ the tests


def test_screenshots(chromium: str, base_url: str, tmp_path: Path) -> None:
    log = screenshot(chromium, tmp_path, f"{base_url}/", "log.png")
    assert_not_blank(log)
    row = screenshot(chromium, tmp_path, f"{base_url}/tables/users/rows/42", "row.png")
    assert_not_blank(row)
    # rolled-back rows of the log are tinted, and the row page's changed cells are green/red
    assert any(p[0] > 240 and p[1] > 240 and 200 < p[2] < 245 for p in log.sample(5)), "no tinted row"
    assert any(p[1] > p[0] + 15 and p[1] > p[2] + 15 for p in row.sample(5)), "no 'after' highlight"


def test_rendered_row_page(chromium: str, base_url: str, tmp_path: Path) -> None:
    dom = run_chromium(chromium, tmp_path, "--dump-dom", f"{base_url}/tables/users/rows/42").stdout
    assert "<h1>" in dom and "users" in dom and "id=42" in dom
    for line in ("INSERT", "email=a@b.com, plan=free", "name: null → Alice Smith", "plan: free → pro",
                 "plan: pro → null", "(rolled back)", "✗ rolled back"):  # fmt: skip
        assert line in dom, line
    for request_id in (REQ_INSERT, REQ_NAME, REQ_PLAN, REQ_FAILED):
        assert f'href="/requests/{request_id}"' in dom, request_id
        assert f"req:{request_id[:8]}" in dom
    positions = [dom.index(s) for s in ("email=a@b.com, plan=free", "plan: free → pro", "plan: pro → null")]
    assert positions == sorted(positions)


def test_rendered_request_page(chromium: str, base_url: str, tmp_path: Path) -> None:
    dom = run_chromium(chromium, tmp_path, "--dump-dom", f"{base_url}/requests/550e8400").stdout
    for text in (REQ_FAILED, "TimeoutError: Stripe API timeout after 10s", "payments/create.ts:42",
                 "plan: pro → null", "status: pending → null", "(rolled back)"):  # fmt: skip
        assert text in dom, text


# ============================================================================ issue 17: previews, search, reference


def dump(chromium: str, tmp_path: Path, url: str) -> str:
    return run_chromium(chromium, tmp_path, "--dump-dom", url).stdout


def test_rendered_revert_preview(chromium: str, undo_url: tuple[str, UndoEnv], tmp_path: Path) -> None:
    url, env = undo_url
    before = env.source_rows()
    dom = dump(chromium, tmp_path, f"{url}/requests/r-plan")
    for text in ("Revert preview", "nothing is applied from this page", "UPDATE", "SET LOCAL",
                 "cdc revert r-plan --apply --force", "changed later (UPDATE)"):  # fmt: skip
        assert text in dom, text
    assert 'href="/requests/r-later"' in dom  # the conflict names the later request
    refused = dump(chromium, tmp_path, f"{url}/requests/r-email")
    assert (
        "Refused: the revert would write redaction placeholders" in refused and "--keep-redacted" in refused
    )
    for value in CLEAR:
        assert value not in dom and value not in refused, value
    assert "hmac-sha256:" not in refused.split("Revert preview", 1)[1]
    assert env.source_rows() == before  # the page applied nothing
    image = screenshot(chromium, tmp_path, f"{url}/requests/r-plan", "revert.png")
    assert_not_blank(image)


def test_rendered_restore_preview(chromium: str, undo_url: tuple[str, UndoEnv], tmp_path: Path) -> None:
    url, env = undo_url
    row = dump(chromium, tmp_path, f"{url}/tables/accounts/rows/3")
    assert "restore…" in row and "/tables/accounts/rows/3/restore?version=" in row
    target = f"{url}/tables/accounts/rows/3/restore?version={format_lsn(env.v0)}"
    dom = dump(chromium, tmp_path, target)
    for text in ("Preview only: nothing is applied from this page", "DELETE FROM", "redacted (hash)",
                 "redacted (mask)", "redacted (exclude)", f"cdc restore accounts --id 3 --version {format_lsn(env.v0)}"):  # fmt: skip
        assert text in dom, text
    for value in CLEAR:
        assert value not in dom, value
    image = screenshot(chromium, tmp_path, target, "restore.png")
    assert_not_blank(image)


def test_rendered_search(chromium: str, base_url: str, tmp_path: Path) -> None:
    dom = dump(chromium, tmp_path, f"{base_url}/search?table=users&column=plan&value=free&limit=3")
    assert 'name="column"' in dom and 'value="plan"' in dom
    assert "the search stopped there" in dom and "Search further back" in dom
    assert dom.count('href="/tables/users/rows/') >= 3
    further = dump(chromium, tmp_path, f"{base_url}/search?table=users&column=email&value=a%40b.com")
    for request_id in (REQ_INSERT, REQ_NAME, REQ_PLAN, REQ_FAILED):
        assert f'href="/requests/{request_id}"' in further, request_id
    assert "Searched every change of users" in further
    assert_not_blank(
        screenshot(chromium, tmp_path, f"{base_url}/search?table=users&column=plan&value=free", "search.png")
    )


def test_rendered_api_reference(chromium: str, base_url: str, tmp_path: Path) -> None:
    log = dump(chromium, tmp_path, f"{base_url}/")
    assert 'href="/docs/api"' in log and 'href="/search"' in log  # the header links to both
    dom = dump(chromium, tmp_path, f"{base_url}/docs/api")
    for text in ("cdc history API", "/api/v1/tables/{table}/search", "/api/v1/requests/{request_id}/revert",
                 "/api/v1/tables/{table}/rows/{key}/restore", "Search by value", "UndoPreview", "ValueSearch",
                 'href="#schema-Mutation"', 'href="/openapi.json"'):  # fmt: skip
        assert text in dom, text
    # nothing from elsewhere: every link and resource is local
    assert "http://" not in dom and "https://" not in dom and "<script" not in dom
    image = screenshot(chromium, tmp_path, f"{base_url}/docs/api", "reference.png")
    assert_not_blank(image)
