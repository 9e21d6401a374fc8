"""`ray up` end to end on this machine: the shipped cluster/single-node.yaml, pointed at an
sshd of the test's own on a spare loopback port, brings up a Ray head with token auth (the
token made by `ray get-auth-token --generate` on the launching side and copied by the
config's file_mounts); `llm-shard serve smollm2-135m` runs on it (through `ray exec`) and
answers one request, while a Ray client with a wrong token or none is refused; `ray down`.

Everything runs as a throwaway user whose home is a temp folder, so that nothing the
launcher writes (~/.bashrc, ~/ray_bootstrap_*, the store, Ray's session files) touches
this machine's own, and so that `ray stop` on the "remote" side cannot reach another
Ray on this machine; at the end every process of that user, the sshd and the launcher's
ssh control masters are gone, and the user is deleted. Needs root and Debian's
openssh-server, openssh-client and rsync (.ci/run installs them); skips, saying which is
absent, otherwise. The store goes over with the config's `file_mounts` (rsync) too: the
test downloads nothing and installs nothing (setup reuses this venv).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TOOLS = {"/usr/sbin/sshd": "openssh-server", "ssh": "openssh-client",
         "ssh-keygen": "openssh-client", "rsync": "rsync", "useradd": "passwd",
         "userdel": "passwd"}
BUDGET = 220.0  # seconds for the whole test, teardown included (pytest's limit below)
MODEL = "smollm2-135m"


def _missing() -> str | None:
    if sys.platform != "linux":
        return "needs Linux (sshd, useradd)"
    if os.geteuid() != 0:
        return "needs root: it runs its own sshd and creates a throwaway user"
    absent = [f"{t} ({pkg})" for t, pkg in TOOLS.items() if shutil.which(t) is None]
    if absent:
        return ("needs " + ", ".join(absent) + ": apt-get install openssh-server "
                "openssh-client rsync (.ci/run does)")
    if not (VENV_BIN / "ray").is_file() or not (VENV_BIN / "llm-shard").is_file():
        return f"needs ray and llm-shard in {VENV_BIN}"
    return None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(_missing() is not None,
                                                   reason=_missing() or "")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self, most: float) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the ray up test ran out of its time budget")
        return min(most, left)


# ssh has no port option in Ray's `auth`; its ProxyCommand (auth.ssh_proxy_command) is how
# a launcher config reaches sshd on another port. This relay is that command, with no
# netcat needed: stdin/stdout <-> a TCP connection.
RELAY = """\
import os, socket, sys, threading
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
def up():
    while data := os.read(0, 65536):
        s.sendall(data)
    s.shutdown(socket.SHUT_WR)
threading.Thread(target=up, daemon=True).start()
while data := s.recv(65536):
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]
"""


def run(cmd: list[str], deadline: Deadline, most: float, log: Path, **kw):
    with open(log, "ab") as out:
        out.write(f"\n$ {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT,
                              timeout=deadline.left(most), **kw)


def processes_of(uid: int) -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["uids", "cmdline", "name"]):
        with contextlib.suppress(psutil.Error):
            if p.info["uids"] and p.info["uids"].real == uid:
                out.append(p)
    return out


def ray_processes(uid: int) -> list[str]:
    """The command lines of the user's processes, its ssh sessions aside."""
    return [" ".join(p.info["cmdline"] or [p.info["name"]])[:100] for p in processes_of(uid)
            if not (p.info["name"] or "").startswith("sshd")]


def kill_all(procs: list) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)


class Host:
    """sshd on 127.0.0.1:PORT with its own host key, letting in one throwaway user by one
    key; everything in `root`."""

    def __init__(self, root: Path, log: Path) -> None:
        import pwd

        self.root, self.log = root, log
        self.user = f"lsr{os.getpid() % 100000}{int(time.time()) % 1000}"
        self.home = root / "home"
        self.key = root / "id_ed25519"
        self.port = free_port()
        self.proc = None
        self.uid = None
        subprocess.run(["useradd", "--home-dir", str(self.home), "--create-home",
                        "--shell", "/bin/bash", "--password", "*", "--user-group", self.user],
                       check=True, capture_output=True)
        self.uid, self.gid = pwd.getpwnam(self.user).pw_uid, pwd.getpwnam(self.user).pw_gid
        try:
            self._start_sshd()
        except BaseException:
            self.close()
            raise

    def _start_sshd(self) -> None:
        root = self.root
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)],
                       check=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(root / "host_key")], check=True)
        auth = root / "authorized_keys"
        auth.write_text(Path(f"{self.key}.pub").read_text())
        auth.chmod(0o644)
        self.config = root / "sshd_config"
        self.config.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {root}/host_key\n"
            f"PidFile {root}/sshd.pid\nAuthorizedKeysFile {auth}\nAllowUsers {self.user}\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "PermitRootLogin no\nLogLevel VERBOSE\n")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(self.config)], check=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT)
        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1):
                break
            time.sleep(0.05)
        self.relay = root / "relay.py"
        self.relay.write_text(RELAY)
        self.proxy = f"{sys.executable} {self.relay} %h {self.port}"

    def ssh(self, command: str, deadline: Deadline, most: float = 60):
        return run(["ssh", "-i", str(self.key), "-o", "StrictHostKeyChecking=no",
                    "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                    "-o", f"ProxyCommand={self.proxy}", f"{self.user}@127.0.0.1", command],
                   deadline, most, self.log)

    def close(self) -> list[str]:
        """Stop sshd and everything of the user; delete the user. Returns what had to be
        killed (the user's processes still alive when this was called)."""
        import psutil

        if self.uid is None:
            return []
        left = processes_of(self.uid)
        names = [" ".join(p.info["cmdline"] or [p.info["name"]])[:120] for p in left]
        kill_all(left)
        if self.proc is not None:
            with contextlib.suppress(psutil.Error):
                sshd = psutil.Process(self.proc.pid)
                kill_all([*sshd.children(recursive=True), sshd])
            self.proc.wait(timeout=10)
        kill_all(processes_of(self.uid))  # anything a dying session started
        subprocess.run(["userdel", self.user], capture_output=True)
        return names


def reuse_venv(home: Path, uid: int, gid: int) -> Path | None:
    """~/llm-shard-env for the throwaway user, made of this venv's packages (no download):
    a venv of its own whose site-packages adds this venv's, with `ray` and `llm-shard`
    scripts. Its interpreter is this venv's base Python if the user may run it, else a
    system Python of the same version (a base under /root is out of the user's reach).
    None when there is none."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [getattr(sys, "_base_executable", None), f"/usr/bin/python{version}",
                  shutil.which(f"python{version}")]
    env = home / "llm-shard-env"
    for python in filter(None, candidates):
        try:
            probe = subprocess.run([python, "-c", "import sys; print(sys.version_info[:2])"],
                                   user=uid, group=gid, capture_output=True, text=True,
                                   cwd=home)
        except OSError:  # not there, or not the user's to run
            continue
        if probe.returncode == 0 and probe.stdout.strip() == str(sys.version_info[:2]):
            break
    else:
        return None
    subprocess.run([python, "-m", "venv", "--without-pip", str(env)], user=uid, group=gid,
                   check=True, capture_output=True, cwd=home)
    site = next(p for p in sys.path if p.endswith("site-packages")
                and Path(p).parent.parent.parent == Path(sys.prefix))
    (env / "lib" / f"python{version}" / "site-packages" / "llm_shard_reuse.pth").write_text(
        f"import site; site.addsitedir({site!r})\n")
    for script in ("ray", "llm-shard"):
        text = (VENV_BIN / script).read_text().split("\n", 1)[1]
        (env / "bin" / script).write_text(f"#!{env}/bin/python\n{text}")
        (env / "bin" / script).chmod(0o755)
    return env


def forget_launcher_state(name: str, before: set[Path]) -> None:
    """What `ray up/exec/down` of cluster `name` left on this (the launching) side: its ssh
    control masters (ControlPersist) and their sockets (under /tmp), its local-provider
    state (Ray's temp dir: $RAY_TMPDIR or $TMPDIR or /tmp, then ray/) and config cache
    ($TMPDIR); `before`: the entries that were there before the test."""
    import psutil
    from ray._common.utils import get_default_ray_temp_dir

    control = hashlib.sha256(name.encode()).hexdigest()[:10]
    kill_all([p for p in psutil.process_iter(["cmdline"])
              if any(f"/{control}/" in a for a in (p.info["cmdline"] or []))])
    for path in Path("/tmp").glob(f"ray_ssh_*/{control}"):
        shutil.rmtree(path, ignore_errors=True)
        if path.parent not in before:
            with contextlib.suppress(OSError):
                path.parent.rmdir()
    for suffix in ("state", "lock"):
        (Path(get_default_ray_temp_dir()) / f"cluster-{name}.{suffix}").unlink(missing_ok=True)
    for path in set(Path(tempfile.gettempdir()).glob("ray-config-*")) - before:
        with contextlib.suppress(OSError):
            if name in path.read_text():
                path.unlink()


TOKEN_FILE = "~/.ray/auth_token"  # where `ray get-auth-token --generate` writes, and Ray reads


def launcher_config(host: Host, store: Path, token: Path) -> tuple[dict, dict[str, int]]:
    """cluster/single-node.yaml as shipped, pointed at `host`: the EDIT lines filled in,
    the token copied from `token` (not this machine's ~/.ray) and the store by file_mounts,
    pip replaced by this venv (no downloads), and the fixed ports of `ray start` (6379,
    10001, 8265, 52365) replaced by free ones, as other Rays may run on this machine.
    Returns the config and {"gcs": port, "dashboard": port}."""
    cfg = yaml.safe_load((REPO / "cluster" / "single-node.yaml").read_text())
    cfg["cluster_name"] = f"llm-shard-e2e-{host.user}"
    cfg["provider"] = {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    cfg["auth"] = {"ssh_user": host.user, "ssh_private_key": str(host.key),
                   "ssh_proxy_command": host.proxy}
    assert cfg["file_mounts"] == {TOKEN_FILE: TOKEN_FILE}, "the shipped file_mounts changed"
    cfg["file_mounts"] = {TOKEN_FILE: str(token),
                          f"~/.cache/llm-shard/{MODEL}-fp32": str(store)}
    setup = [c for c in cfg["setup_commands"] if "pip install" not in c]
    assert len(setup) == len(cfg["setup_commands"]) - 1, "the shipped setup changed"
    cfg["setup_commands"] = setup + [
        "~/llm-shard-env/bin/python -c 'import llm_shard, ray, torch'"]
    port = {"gcs": free_port(), "dashboard": free_port()}
    ports = (f"--port={port['gcs']} --ray-client-server-port={free_port()} "
             f"--dashboard-port={port['dashboard']} "
             f"--dashboard-agent-listen-port={free_port()}")
    start = [c.replace("--port=6379", ports) for c in cfg["head_start_ray_commands"]]
    assert any(ports in c for c in start), "the shipped head start command changed"
    cfg["head_start_ray_commands"] = start
    return cfg, port


def ray_clients(gcs: str, tokens: dict[str, str | None], root: Path) -> dict[str, subprocess.Popen]:
    """`ray status --address gcs` from this (the launching) side, one process per entry of
    `tokens` (name: RAY_AUTH_TOKEN, or None for a client with auth off), started at once
    and left running (they overlap serve's start). Their HOME holds no token file, so each
    has only the token it is given; output to root/client-NAME.txt."""
    home = root / "client-home"
    home.mkdir(exist_ok=True)
    procs = {}
    for name, token in tokens.items():
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
        env |= {"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0",
                "RAY_AUTH_MODE": "disabled" if token is None else "token"}
        if token is not None:
            env["RAY_AUTH_TOKEN"] = token
        with open(root / f"client-{name}.txt", "wb") as out:
            procs[name] = subprocess.Popen([str(VENV_BIN / "ray"), "status", "--address", gcs],
                                           stdout=out, stderr=subprocess.STDOUT, env=env)
    return procs


@pytest.fixture(scope="module")
def store(smollm2_path, tmp_path_factory):
    """SmolLM2 as an fp32 store (what the head gets through file_mounts): converted here,
    ~20 s, not inside the test's time budget."""
    from llm_shard.models.checkpoint.convert import convert

    return convert(smollm2_path, tmp_path_factory.mktemp("rayup") / "fp32", dtype="fp32",
                   progress=False)


@pytest.mark.timeout(int(BUDGET) + 30, func_only=True)  # the store is made before
def test_ray_up_serve_one_request_ray_down(store, tmp_path, capsys):
    import psutil

    deadline = Deadline(BUDGET)
    root = Path(tempfile.mkdtemp(prefix="lsr-"))  # short: Ray's socket paths live under it
    root.chmod(0o755)
    log = root / "log.txt"
    host, serve, clients, t0 = None, None, {}, time.perf_counter()
    before = (set(Path("/tmp").glob("ray_ssh_*"))
              | set(Path(tempfile.gettempdir()).glob("ray-config-*")))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}"}
    times: dict[str, float] = {}
    leftovers: dict[str, list[str]] = {}
    try:
        host = Host(root, log)
        tmp = root / "t"  # the user's temp files (Ray's sessions, torch's caches) go here
        tmp.mkdir()
        os.chown(tmp, host.uid, host.gid)
        # the login's environment, as a user would set it in ~/.bashrc; the config's setup
        # commands add the venv's activation and RAY_AUTH_MODE=token
        with open(host.home / ".bashrc", "a") as f:
            f.write(f"export TMPDIR={tmp} RAY_TMPDIR={tmp} RAY_USAGE_STATS_ENABLED=0\n")
        if reuse_venv(host.home, host.uid, host.gid) is None:
            pytest.skip(f"no Python {sys.version_info.major}.{sys.version_info.minor} that "
                        "an unprivileged user may run (this venv's is out of its reach)")
        ray = str(VENV_BIN / "ray")
        # the config's first step, run as its comment says, in a HOME of the test's own
        launcher_home = root / "launcher"
        launcher_home.mkdir()
        made = run([ray, "get-auth-token", "--generate"], deadline, 60, log,
                   env={**env, "HOME": str(launcher_home)})
        assert made.returncode == 0, f"ray get-auth-token failed; see {tmp_path}/log.txt"
        token_path = launcher_home / ".ray" / "auth_token"
        token = token_path.read_text().strip()
        assert len(token) >= 32
        cfg, port = launcher_config(host, store.path, token_path)
        cfg_path = root / "cluster.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg))

        t = time.perf_counter()
        up = run([ray, "up", "-y", "--no-config-cache", str(cfg_path)], deadline, 120, log,
                 env=env)
        times["ray up"] = time.perf_counter() - t
        assert up.returncode == 0, f"ray up failed; see {tmp_path}/log.txt"
        # Ray clients of the head's GCS: with the token, with a wrong one, with none
        clients = ray_clients(f"127.0.0.1:{port['gcs']}",
                              {"right": token, "wrong": "0" * 64, "none": None}, root)

        t = time.perf_counter()
        # port 0: serve takes one, and says it; the head's address named, not `auto`
        # (which may pick another Ray this machine runs)
        with open(root / "serve.txt", "ab") as out:
            serve = subprocess.Popen(
                [ray, "exec", "--no-config-cache", str(cfg_path),
                 f"echo $BASHPID > ~/serve.pid; exec env RAY_AUTH_MODE=token llm-shard "
                 f"serve {MODEL} --dtype fp32 --address 127.0.0.1:{port['gcs']} --port 0"],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while True:
            said = re.search(r"^serving \S+ on (http://\S+) ",
                             (root / "serve.txt").read_text(errors="replace"), re.M)
            url = said and said[1]
            with contextlib.suppress(OSError):
                if url:
                    with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                        if r.status == 200:
                            break
            assert serve.poll() is None, \
                f"serve exited; see {tmp_path}/serve.txt"
            deadline.left(1)
            time.sleep(1)
        times["serve ready"] = time.perf_counter() - t
        body = json.dumps({"model": MODEL, "prompt": "The capital of France is",
                           "max_tokens": 8, "temperature": 0,
                           "return_token_ids": True}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=deadline.left(60)) as r:
            out = json.load(r)
        choice = out["choices"][0]
        assert choice["text"].strip() and out["usage"]["completion_tokens"] >= 1
        # the served model is the store file_mounts copied, run on the head's Ray worker
        from llm_shard.models.runner import LocalModel

        tok = store.tokenizer()
        want = LocalModel(store).greedy(tok.encode("The capital of France is"), 8,
                                        tok.eos_ids)
        assert choice["token_ids"] == want
        copied = host.home / ".cache" / "llm-shard" / f"{MODEL}-fp32" / "manifest.json"
        assert copied.read_bytes() == (store.path / "manifest.json").read_bytes()

        # the control plane: the head holds the copied token, privately, and refuses a
        # client without it (a wrong one, or none) while one with it gets in
        t = time.perf_counter()
        held = host.home / ".ray" / "auth_token"
        assert held.read_text().strip() == token and held.stat().st_mode & 0o077 == 0
        answers = {}
        for name, proc in clients.items():
            proc.wait(timeout=deadline.left(60))
            answers[name] = (root / f"client-{name}.txt").read_text(errors="replace")
        assert clients["right"].returncode == 0, answers["right"][-2000:]
        for name in ("wrong", "none"):
            assert clients[name].returncode != 0, f"a client with {name} token got in"
            assert "Authentication token is missing or incorrect" in answers[name], \
                answers[name][-2000:]
        # the dashboard (its job API runs code) wants the token too
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port['dashboard']}/api/version",
                                   timeout=deadline.left(10))
        assert refused.value.code == 401
        times["auth wait"] = time.perf_counter() - t

        t = time.perf_counter()
        # Ctrl-C to serve (it stops its workers), then its `ray exec` returns
        pid = int((host.home / "serve.pid").read_text())
        assert psutil.Process(pid).uids().real == host.uid
        host.ssh(f"kill -INT {pid}", deadline, 30)
        serve.wait(timeout=deadline.left(30))
        down = run([ray, "down", "-y", str(cfg_path)], deadline, 60, log,
                   env=env)
        assert down.returncode == 0, f"ray down failed; see {tmp_path}/log.txt"
        leftovers["after ray down"] = ray_processes(host.uid)
        # `ray down` runs `ray stop` on the head (Ray 2.60); older ones forgot the node but
        # left Ray running there. Stop it as the user would, as homelab.yaml says.
        stop = host.ssh("~/llm-shard-env/bin/ray stop --force", deadline, 60)
        assert stop.returncode == 0, f"ray stop failed; see {tmp_path}/log.txt"
        time.sleep(1)
        leftovers["after ray stop"] = ray_processes(host.uid)
        times["ray down + stop"] = time.perf_counter() - t
    finally:
        for proc in clients.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if serve is not None and serve.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(serve.pid, signal.SIGKILL)
            serve.wait(timeout=10)
        killed = host.close() if host is not None else []
        if host is not None:
            forget_launcher_state(f"llm-shard-e2e-{host.user}", before)
        times["total"] = time.perf_counter() - t0
        with capsys.disabled():
            print(f"\nray up e2e: {json.dumps({k: round(v, 1) for k, v in times.items()})}; "
                  f"left after ray down: {leftovers.get('after ray down')}, after ray stop: "
                  f"{leftovers.get('after ray stop')}; killed at the end: {killed}")
        survivors = processes_of(host.uid) if host is not None and host.uid else []
        # kept by pytest, for a failure's story
        for name in ("log.txt", "serve.txt", *(f"client-{n}.txt" for n in clients)):
            with contextlib.suppress(OSError):
                shutil.copy(root / name, tmp_path / name)
        shutil.rmtree(root, ignore_errors=True)
    assert not survivors, f"processes of the test user survived: {survivors}"
    assert not leftovers["after ray stop"], \
        f"ray stop left processes running: {leftovers['after ray stop']}"
