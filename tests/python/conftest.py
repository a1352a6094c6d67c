"""Spawns the real `zerotouch` binary on free ports with a fresh data dir for each test module,
once on SQLite (the default) and once on PostgreSQL chosen only through ZEROTOUCH__DATABASE__URL."""

import json
import random
import os
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[2]
BINARY = Path(os.environ.get("ZEROTOUCH_BIN", ROOT / "target" / "debug" / "zerotouch"))
PG_ADMIN_URL = os.environ.get("ZEROTOUCH_TEST_PG_URL", "postgres://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite"] if os.environ.get("ZEROTOUCH_TEST_SKIP_PG") == "1" else ["sqlite", "postgres"]


def free_port(ip="127.0.0.1"):
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def free_loopback_ip():
    """A 127.0.x.y whose ports 8883 and 5671 are free: the Azure device SDK always dials 8883
    and the service SDKs' AMQP 5671, so each server gets an address of its own and tests can
    run side by side."""
    for _ in range(200):
        ip = f"127.0.{random.randint(1, 254)}.{random.randint(2, 254)}"
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind((ip, 8883))
                b.bind((ip, 5671))
                return ip
            except OSError:
                continue
    raise RuntimeError("no free loopback address with ports 8883 and 5671")


class Server:
    def __init__(self, data_dir: Path, env: dict):
        self.data_dir = data_dir
        self.env = env
        self.ip = free_loopback_ip()
        self.https_port = free_port(self.ip)
        self.mqtt_port = 8883
        self.config = data_dir.parent / "zerotouch.toml"
        self.config.write_text(
            "[listen]\n"
            f'https = "{self.ip}:{self.https_port}"\n'
            f'mqtt = "{self.ip}:{self.mqtt_port}"\n'
            f'amqp = "{self.ip}:5671"\n'
            "[service]\n"
            f'hostnames = ["{self.ip}", "localhost"]\n'
        )
        self.log_path = data_dir.parent / "server.log"
        self.process = None
        self.credentials = None
        self.start()

    def start(self):
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(BINARY), "serve", "--config", str(self.config), "--data-dir", str(self.data_dir)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )

    def restart(self, kill=False):
        if kill:
            self.process.kill()
            self.process.wait(timeout=10)
            self.log.close()
        else:
            self.stop()
        self.start()
        self.wait_ready()

    def wait_ready(self, timeout=60):
        deadline = time.time() + timeout
        # A hub that joined a provisioning service presents a certificate from that service's CA.
        joined = self.data_dir / "join" / "trust.pem"
        while time.time() < deadline:
            bundle = joined if joined.exists() else self.data_dir / "ca" / "bundle.pem"
            if self.process.poll() is not None:
                raise RuntimeError(f"zerotouch exited with {self.process.returncode}")
            if bundle.exists():
                try:
                    r = requests.get(f"https://{self.ip}:{self.https_port}/healthz", verify=str(bundle), timeout=2)
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
            env=self.env,
        )
        self.credentials = json.loads(out.stdout)

    def stop(self):
        if self.process.poll() is not None:
            self.log.close()
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def psql(sql: str):
    subprocess.run(["psql", PG_ADMIN_URL, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql], check=True)


@pytest.fixture(scope="module", params=BACKENDS)
def server(request):
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing: build it with cargo build --bin zerotouch")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEROTOUCH__")}
    database = None
    if request.param == "postgres":
        database = f"zt_py_{uuid.uuid4().hex[:12]}"
        psql(f"CREATE DATABASE {database}")
        env["ZEROTOUCH__DATABASE__URL"] = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + database
    with tempfile.TemporaryDirectory() as tmp:
        srv = Server(Path(tmp) / "data", env)
        try:
            srv.wait_ready()
            # The backend in force is the one asked for: SQLite writes its file into the data dir.
            sqlite_file = (Path(tmp) / "data" / "zerotouch.db").exists()
            assert sqlite_file == (request.param == "sqlite"), request.param
            yield srv
        finally:
            srv.stop()
            if request.node.session.testsfailed:
                print(srv.log_path.read_text(errors="replace")[-4000:])
            if database:
                psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
