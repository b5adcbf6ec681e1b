"""`cdc demo --keep` as a user runs it: every step once, no log lines, and the commands it says
to try next work as printed (the page and the API of `cdc serve`, the Python API, status)."""

from __future__ import annotations

import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cdc.devdb_host import available_flavors
from cdc.exit_codes import ExitCode

ROOT = Path(__file__).resolve().parents[2]


def _command(line: str) -> list[str]:
    return shlex.split(line, comments=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(not available_flavors(), reason="no PostgreSQL server binaries")
def test_demo_keep_prints_each_step_once_and_what_to_try_next() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDC_", "PG"))}
    demo = subprocess.run(
        [sys.executable, "-m", "cdc", "demo", "--keep"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    out = demo.stdout
    assert demo.stderr == "", demo.stderr  # no log line at all
    steps = [line.strip() for line in out.splitlines() if line.strip().startswith("setup:")]
    assert len(steps) >= 4 and len(steps) == len(set(steps)), steps
    assert not re.search(r"\[(debug|info)\s*\]|setup_step|batch_written", out)
    assert "What to try next" in out
    block = out.split("What to try next", 1)[1].splitlines()[1:]
    exports = dict(re.findall(r"export (CDC_\w+)='([^']*)'", "\n".join(block)))
    assert set(exports) == {"CDC_SOURCE_DSN", "CDC_STORE_DSN"}
    env.update(exports)
    kill = next(line for line in block if line.strip().startswith("kill "))
    try:
        python = _command(next(line for line in block if " -c " in line))
        row = subprocess.run(
            python, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=True
        )
        assert "'id': 42" in row.stdout and "'plan': 'pro'" in row.stdout, row.stdout + row.stderr

        status = _command(next(line for line in block if " status" in line))
        checked = subprocess.run(
            status, capture_output=True, text=True, timeout=60, env=env, cwd=ROOT, check=False
        )
        assert checked.returncode == ExitCode.UNHEALTHY and "no daemon is streaming" in checked.stdout

        port = _free_port()
        serve = [
            *_command(next(line for line in block if " serve " in line)),
            "--listen",
            f"127.0.0.1:{port}",
        ]
        curl = next(line for line in block if "curl " in line)
        path = re.search(r"http://127\.0\.0\.1:8400(/\S+)", curl)
        assert path is not None
        server = subprocess.Popen(
            serve, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}{path.group(1)}", timeout=5
                    ) as response:
                        body = response.read().decode()
                    break
                except OSError:
                    assert time.monotonic() < deadline, "cdc serve did not answer"
                    time.sleep(0.2)
            assert '"table":"public.users"' in body and '"op":"INSERT"' in body
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                assert page.status == 200
        finally:
            server.terminate()
            server.wait(30)
    finally:
        subprocess.run(kill, shell=True, check=True, timeout=60)
    pid = int(re.search(r"kill (\d+)", kill).group(1))  # type: ignore[union-attr]
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()
