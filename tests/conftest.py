"""Shared fixtures: a tiny synthetic world, a tiny config, one tiny trained artifact per session.

Tests run on one torch thread: the machine has two cores and tests run beside other processes
(uvicorn, redis-server).
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from ranker.config import Config, load_config
from training.synth import WorldConfig, generate

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "default.toml"
RANKING_CONFIG = ROOT / "configs" / "ranking.toml"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(WorldConfig.small(n_requests=600, rows_per_file=4000), out, progress=False)
    return out


def tiny_overrides(world: Path, tmp: Path) -> list[str]:
    return [
        f'data.log="{world / "log"}"',
        f'data.users="{world / "users.parquet"}"',
        f'data.videos="{world / "videos.parquet"}"',
        "model.num_experts=2",
        "model.expert_hidden=[16]",
        "model.tower_hidden=[8]",
        "model.embedding_dim=4",
        "training.epochs=3",
        "training.lr=0.005",
        "training.batch_size=256",
        "training.shuffle_buffer=2048",
        f'training.run_dir="{tmp / "run"}"',
        f'export.artifact_root="{tmp / "artifacts"}"',
        # auto times its engines on these at every start-up and reload: keep them small
        "export.sample_requests=6",
        "export.sample_candidates=200",
    ]


@pytest.fixture(scope="session")
def tiny_config(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Config:
    tmp = tmp_path_factory.mktemp("train")
    return load_config(DEFAULT_CONFIG, tiny_overrides(tiny_world, tmp))


@pytest.fixture(scope="session")
def tiny_trained(tiny_config: Config):  # noqa: ANN201 - TrainResult
    from training.loop import train

    return train(tiny_config, progress=False, export=True)


@pytest.fixture(scope="session")
def tiny_artifact(tiny_trained) -> Path:  # noqa: ANN001
    assert tiny_trained.artifact is not None
    return tiny_trained.artifact


# --- A real Redis for the feature-store tests -------------------------------------------------


def _free_loopback_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real ``redis-server`` on a free loopback port, no persistence, in its own directory.

    ``stop()`` then ``start()`` brings it back on the same port (empty: nothing is saved);
    ``pause()`` / ``resume()`` (SIGSTOP / SIGCONT) make it a server that accepts connections
    but never answers, which is what a stalled Redis looks like to a client.
    """

    def __init__(self, directory: Path, password: str | None = None) -> None:
        import shutil

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail(
                "redis-server is not installed: `apt-get install redis-server` (.ci/run does it)"
            )
        self.exe, self.dir, self.password = exe, directory, password
        self.port = _free_loopback_port()
        self.proc: subprocess.Popen | None = None

    def url(self, db: int = 0, password: str | None = None) -> str:
        pw = password if password is not None else self.password
        return f"redis://{f':{pw}@' if pw else ''}127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 10.0) -> None:
        import redis

        args = [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir), "--daemonize", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - the server's lifetime
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=1.0)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                out = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"redis-server exited with {self.proc.returncode}:\n{out}")
            try:
                if client.ping():
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"redis-server did not answer on port {self.port} in {timeout} s")
            time.sleep(0.02)
        client.close()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.resume()  # a stopped process would hold SIGTERM until continued
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextmanager
def redis_server(directory: Path, password: str | None = None) -> Iterator[RedisServer]:
    """A started :class:`RedisServer`, stopped on exit whatever the test did to it."""
    server = RedisServer(directory, password)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def redis_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis per test module (tests that break their server start their own)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


# --- A real Redis Cluster: 3 masters, 3 replicas ----------------------------------------------


def _free_cluster_port() -> int:
    """A loopback port free for the node and for its cluster bus (port + 10000)."""
    import socket

    for _ in range(200):
        port = _free_loopback_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    pytest.fail("no free loopback port pair for a cluster node")


class RedisClusterNodes:
    """Six ``redis-server --cluster-enabled yes`` on free loopback ports, joined with
    ``redis-cli --cluster create --cluster-replicas 1``: three masters, one replica each.

    ``cluster-node-timeout`` is 1 s so a replica takes over from a killed master in a few
    seconds; :meth:`kill_master` does that, :meth:`restart` brings a node back (it rejoins as a
    replica of the master that replaced it)."""

    def __init__(self, directory: Path, nodes: int = 6, node_timeout_ms: int = 1000) -> None:
        import shutil

        self.exe, self.cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if self.exe is None or self.cli is None:
            pytest.fail("redis-server/redis-cli are not installed (.ci/run installs them)")
        self.dir, self.node_timeout_ms = directory, node_timeout_ms
        self.ports = [_free_cluster_port() for _ in range(nodes)]
        self.procs: dict[int, subprocess.Popen] = {}
        self.killed: set[int] = set()

    def url(self) -> str:
        """The cluster URL the service and the push take (any node; the rest is discovered)."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}/0"

    def start_node(self, port: int) -> None:
        d = self.dir / str(port)
        d.mkdir(parents=True, exist_ok=True)
        args = [self.exe, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(d), "--daemonize", "no"]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-node-timeout", str(self.node_timeout_ms)]
        # A replica may take over however long its link was down: a test kills a master
        # moments after the cluster formed, before the replica's link ever counted as fresh.
        args += ["--cluster-replica-validity-factor", "0"]
        with open(d / "redis.log", "ab") as log:
            self.procs[port] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)

    def client(self, port: int):  # noqa: ANN201 - redis.Redis
        import redis

        return redis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=1.0)

    def _wait(self, check, what: str, timeout: float) -> None:  # noqa: ANN001
        import redis

        deadline = time.monotonic() + timeout
        while True:
            for port, proc in self.procs.items():
                if port not in self.killed and proc.poll() is not None:
                    log = (self.dir / str(port) / "redis.log").read_text(errors="replace")
                    pytest.fail(f"cluster node {port} exited:\n{log[-2000:]}")
            try:
                if check():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"Redis Cluster: not {what} within {timeout} s")
            time.sleep(0.1)

    def start(self, timeout: float = 60.0) -> None:
        for port in self.ports:
            self.start_node(port)
        self._wait(lambda: all(self.client(p).ping() for p in self.ports), "answering", timeout)
        out = subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports)]
            + ["--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if out.returncode != 0:
            pytest.fail(f"redis-cli --cluster create failed:\n{out.stdout}\n{out.stderr}")
        self.wait_ok(timeout)

    def roles(self) -> dict[int, str]:
        """Port -> ``master`` / ``slave`` for every running node, as each node says itself."""
        return {p: self.client(p).execute_command("ROLE")[0].decode() for p in self.running()}

    def running(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 60.0, replicas: bool = True) -> None:
        """Every running node says ``cluster_state:ok``, three masters serve the slots and, with
        ``replicas``, each has a replica attached."""

        def ok() -> bool:
            for p in self.running():
                info = self.client(p).execute_command("CLUSTER", "INFO").decode()
                if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
                    return False
            roles = self.roles()
            masters = [p for p, r in roles.items() if r == "master"]
            if len(masters) != 3:
                return False
            return not replicas or all(
                self.client(p).info("replication")["connected_slaves"] >= 1 for p in masters
            )

        self._wait(ok, "ok", timeout)

    def kill_master(self) -> int:
        """SIGKILLs one master; returns its port."""
        port = next(p for p, r in self.roles().items() if r == "master")
        self.killed.add(port)
        self.procs[port].kill()
        self.procs[port].wait()
        return port

    def restart(self, port: int) -> None:
        self.killed.discard(port)
        self.start_node(port)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextmanager
def redis_cluster(directory: Path) -> Iterator[RedisClusterNodes]:
    """A started, ok :class:`RedisClusterNodes`, stopped on exit and its files removed."""
    import shutil

    nodes = RedisClusterNodes(directory)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(directory, ignore_errors=True)
