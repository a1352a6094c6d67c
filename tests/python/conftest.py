"""Spawns the real `zerotouch` binary on free ports with a fresh data dir for each test module."""

import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("ZEROTOUCH_BIN", ROOT / "target" / "debug" / "zerotouch"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.https_port = free_port()
        self.mqtt_port = free_port()
        self.config = data_dir.parent / "zerotouch.toml"
        self.config.write_text(
            "[listen]\n"
            f'https = "127.0.0.1:{self.https_port}"\n'
            f'mqtt = "127.0.0.1:{self.mqtt_port}"\n'
            "[service]\n"
            'hostnames = ["localhost", "127.0.0.1"]\n'
        )
        self.log = open(data_dir.parent / "server.log", "wb")
        self.process = subprocess.Popen(
            [str(BINARY), "serve", "--config", str(self.config), "--data-dir", str(data_dir)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.credentials = None

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        bundle = self.data_dir / "ca" / "bundle.pem"
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"zerotouch exited with {self.process.returncode}")
            if bundle.exists():
                try:
                    r = requests.get(f"https://localhost:{self.https_port}/healthz", verify=str(bundle), timeout=2)
                    if r.status_code == 200:
                        break
                except requests.RequestException:
                    pass
            time.sleep(0.2)
        else:
            raise TimeoutError("zerotouch did not become healthy")
        out = subprocess.run(
            [str(BINARY), "credentials", "--config", str(self.config), "--data-dir", str(self.data_dir), "--json"],
            check=True,
            capture_output=True,
        )
        self.credentials = json.loads(out.stdout)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server():
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: build it with cargo build --bin zerotouch")
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp) / "data")
        try:
            srv.wait_ready()
            yield srv
        finally:
            srv.stop()
