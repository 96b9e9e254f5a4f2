"""A real Flower 1.42 deployment on this machine: one SuperLink, one SuperNode per site.

`launch.deploy_local` and the tests use it to run the federation through the same processes
a multi-machine deployment runs (SuperLink, SuperNodes, `flwr run`), only on 127.0.0.1 with
free ports and without TLS. Every component starts in its own process group and logs to
`<workdir>/logs/<component>.log`; `stop()` (and leaving the `with` block, whatever happened)
ends every process it started, including the ones Flower detaches (the SuperLink starts its
SuperExec in a new session): each child carries a per-deployment tag in its environment,
and a final sweep of /proc ends whatever still carries it.

    with LocalDeployment(workdir, {"s0": "/abs/s0", "s1": "/abs/s1"}) as dep:
      status = dep.run(timeout=600)

`flwr run` exits 0 even when the ServerApp fails; `run` reads the ServerApp's
`<workdir>/deploy_status.json` instead and raises DeployError with the server's error and
the tail of the logs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from fedjax_lora.deploy import flower_apps, worker
from fedjax_lora.errors import DeployError

APP_DIR = str(Path(__file__).resolve().parent / "flwr_app")
CONNECTION = "fedjax-local"
TAG_ENV = "FEDJAX_DEPLOY_TAG"
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Flower colours its log levels
_GRACE = 10.0  # seconds between SIGTERM and SIGKILL (2 loaded cores: JAX exits take ~3 s)


def _bin_dir() -> str:
  # the venv's bin, not its resolved target: the flwr CLIs live beside the venv's python
  return os.path.dirname(os.path.abspath(sys.executable))


def _tool(name: str) -> str:
  path = shutil.which(name, path=_bin_dir())
  if path is None:
    raise DeployError(f"{name} not found in {_bin_dir()} (next to {sys.executable}); install "
                      "flwr==1.42.0 into this environment")
  return path


def free_ports(n: int) -> list[int]:
  """`n` distinct TCP ports free on 127.0.0.1 right now (held open together while picked)."""
  socks = []
  try:
    for _ in range(n):
      s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
      s.bind(("127.0.0.1", 0))
      socks.append(s)
    return [s.getsockname()[1] for s in socks]
  finally:
    for s in socks:
      s.close()


def tagged_processes(tag: str) -> list[str]:
  """'pid command line' of every live process whose environment carries `tag` (zombies have
  no environment and are not listed)."""
  needle = f"{TAG_ENV}={tag}".encode()
  out = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit() or int(entry) == os.getpid():
      continue
    try:
      with open(f"/proc/{entry}/environ", "rb") as f:
        if needle not in f.read().split(b"\0"):
          continue
      with open(f"/proc/{entry}/cmdline", "rb") as f:
        cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:  # gone meanwhile, or not ours to read
      continue
    out.append(f"{entry} {cmd}")
  return out


def _node_config_value(path: str, site: str) -> str:
  # --node-config is parsed as TOML basic strings: a quote or backslash would break it
  if '"' in path or "\\" in path:
    raise DeployError(f"site {site}: site dir {path!r} contains a quote or backslash, which "
                      "--node-config cannot carry; rename the directory")
  return f'{flower_apps.SITE_DIR_KEY}="{path}"'


class _Component:
  """A started process, its own process group, and its log file."""

  def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path, cwd: str):
    self.name, self.log_path = name, log_path
    self._log_file = open(log_path, "ab")  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                 stdout=self._log_file, stderr=subprocess.STDOUT,
                                 start_new_session=True)

  def alive(self) -> bool:
    return self.proc.poll() is None

  def signal(self, sig: int) -> None:
    try:
      os.killpg(self.proc.pid, sig)  # pgid == pid: start_new_session
    except ProcessLookupError:
      pass

  def reap(self, timeout: float) -> bool:
    try:
      self.proc.wait(timeout=max(timeout, 0.0))
      return True
    except subprocess.TimeoutExpired:
      return False

  def close(self) -> None:
    self._log_file.close()

  def text(self) -> str:
    try:
      return self.log_path.read_text(errors="replace")
    except OSError:
      return ""


class LocalDeployment:
  """SuperLink + one SuperNode (and optionally one resident worker) per site, on 127.0.0.1.

  `site_dirs` maps a site's name (used in log names and `kill_site`) to its directory, which
  the SuperNode receives as `--node-config 'site-dir="..."'`. With `resident_workers`, each
  site also gets `python -m fedjax_lora.deploy.worker`, started before its SuperNode and
  waited for (`<site-dir>/worker.ready`). `env` adds to every component's environment.
  After `start()`, `node_ids` maps each site to its Flower node id and `timings` holds the
  start-up seconds."""

  def __init__(self, workdir: str, site_dirs: Mapping[str, str], *,
               resident_workers: bool = False, env: Mapping[str, str] | None = None,
               log: Callable[[str], None] | None = None, app_dir: str = APP_DIR,
               start_timeout: float = 120.0, worker_timeout: float = 900.0):
    self.workdir = Path(workdir).resolve()
    if not site_dirs:
      raise DeployError("LocalDeployment needs at least one site")
    self.site_dirs = {name: str(Path(d).resolve()) for name, d in site_dirs.items()}
    for name, d in self.site_dirs.items():
      if not os.path.isdir(d):
        raise DeployError(f"site {name}: site dir {d} does not exist")
      _node_config_value(d, name)
      if resident_workers:
        worker.socket_path(d)  # too long for a Unix socket: say so before starting anything
    self.resident_workers = resident_workers
    self.app_dir = app_dir
    self.start_timeout, self.worker_timeout = start_timeout, worker_timeout
    self._log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    self.tag = uuid.uuid4().hex
    self.logs = self.workdir / "logs"
    self.home = self.workdir / "flwr_home"
    self.port = 0
    self.node_ids: dict[str, int] = {}
    self.timings: dict[str, float] = {}
    self.last_run_id: int | None = None
    self._procs: dict[str, _Component] = {}
    self._extra_env = dict(env or {})
    self._started = False

  # -- environment ------------------------------------------------------------------------

  def _env(self, flwr_home: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = _bin_dir() + os.pathsep + env.get("PATH", "")
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",  # no network from here, and none wanted
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",  # logs reach the files as they happen
        # every ClientApp process and worker shares compiled programs through this cache
        "JAX_COMPILATION_CACHE_DIR": str(self.workdir / "jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PLATFORMS": "cpu",
    })
    env.update(self._extra_env)
    env[TAG_ENV] = self.tag  # last: the sweep in stop() relies on it
    return env

  def _start(self, name: str, cmd: list[str], flwr_home: Path) -> _Component:
    flwr_home.mkdir(parents=True, exist_ok=True)
    comp = _Component(name, cmd, self._env(flwr_home), self.logs / f"{name}.log",
                      cwd=str(flwr_home))
    self._procs[name] = comp
    return comp

  def _write_cli_config(self) -> None:
    self.home.mkdir(parents=True, exist_ok=True)
    (self.home / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "127.0.0.1:{self.port}"\n'
        "insecure = true\n", encoding="utf-8")

  # -- start-up ---------------------------------------------------------------------------

  def _wait(self, what: str, comps: list[_Component], ready: Callable[[], bool],
            timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
      for comp in comps:
        if not comp.alive():
          raise DeployError(f"{comp.name} exited with code {comp.proc.returncode} while "
                            f"waiting for {what}\n{self.tails([comp.name])}")
      if time.monotonic() > deadline:
        raise DeployError(f"{what}: not ready within {timeout:g} s\n"
                          f"{self.tails([c.name for c in comps])}")
      time.sleep(0.1)

  def _port_open(self) -> bool:
    try:
      with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
        return True
    except OSError:
      return False

  def start(self) -> LocalDeployment:
    """Starts everything and waits until every SuperNode is connected; on failure, stops
    what was started and raises DeployError with the failing component's log tail."""
    if self._started:
      raise DeployError(f"deployment in {self.workdir} is already started")
    self._started = True
    try:
      self._start_all()
    except BaseException:
      self.stop()
      raise
    return self

  def _start_all(self) -> None:
    self.logs.mkdir(parents=True, exist_ok=True)
    (self.workdir / "jax_cache").mkdir(parents=True, exist_ok=True)
    sites = list(self.site_dirs)
    self.port, *node_ports = free_ports(1 + len(sites))
    self._write_cli_config()
    t0 = time.monotonic()
    link = self._start("superlink", [
        _tool("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
        "--port", str(self.port)], self.home / "superlink")
    # the workers load the base model meanwhile: they need no SuperLink
    workers = []
    if self.resident_workers:
      for name in sites:
        ready = Path(worker.ready_path(self.site_dirs[name]))
        if ready.exists():
          ready.unlink()
        workers.append(self._start(f"worker-{name}", [
            sys.executable, "-m", "fedjax_lora.deploy.worker",
            f"--site-dir={self.site_dirs[name]}"], self.home / f"worker-{name}"))
    self._wait("the SuperLink", [link], self._port_open, self.start_timeout)
    self.timings["superlink_ready_s"] = time.monotonic() - t0
    self._log(f"SuperLink ready on 127.0.0.1:{self.port} after "
              f"{self.timings['superlink_ready_s']:.1f} s")
    if workers:
      self._wait("the resident workers", workers,
                 lambda: all(os.path.exists(worker.ready_path(d))
                             for d in self.site_dirs.values()), self.worker_timeout)
      self.timings["workers_ready_s"] = time.monotonic() - t0
      self._log(f"resident workers ready after {self.timings['workers_ready_s']:.1f} s")
    t1 = time.monotonic()
    nodes = [self._start(f"supernode-{name}", [
        _tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
        "--port", str(port), "--node-config", _node_config_value(self.site_dirs[name], name)],
        self.home / f"node-{name}") for name, port in zip(sites, node_ports)]

    def connected() -> bool:
      for name, comp in zip(sites, nodes):
        if name not in self.node_ids:
          found = _NODE_ID.search(comp.text())
          if found:
            self.node_ids[name] = int(found.group(1))
      return len(self.node_ids) == len(sites)

    self._wait("the SuperNodes", nodes, connected, self.start_timeout)
    self.timings["nodes_connected_s"] = time.monotonic() - t1
    self._log(f"{len(nodes)} SuperNodes connected after "
              f"{self.timings['nodes_connected_s']:.1f} s: {self.node_ids}")

  # -- running ----------------------------------------------------------------------------

  def run(self, timeout: float, run_config: Mapping[str, object] | None = None) -> dict:
    """Runs the federation (`flwr run ... --stream`) and returns the ServerApp's status
    ({"status": "ok", "seconds": ...}); DeployError with the server's error and the logs'
    tails if it failed, wrote no status, or did not finish within `timeout` seconds.
    `run_config` adds keys that `flwr_app/pyproject.toml` declares."""
    if not self._started or "superlink" not in self._procs:
      raise DeployError("LocalDeployment.run: call start() (or use `with`) first")
    status_path = self.workdir / flower_apps.STATUS_FILE
    if status_path.exists():
      status_path.unlink()
    config = {"workdir": str(self.workdir), **(run_config or {})}
    cmd = [_tool("flwr"), "run", self.app_dir, CONNECTION, "--stream"]
    for key, value in config.items():
      cmd += ["--run-config", f"{key}={json.dumps(value)}"]  # JSON strings read as TOML
    name = f"flwr-run-{sum(n.startswith('flwr-run') for n in self._procs) + 1}"
    start = time.monotonic()
    comp = self._start(name, cmd, self.home)
    finished = comp.reap(timeout)
    seconds = time.monotonic() - start
    found = _RUN_ID.search(comp.text())
    self.last_run_id = int(found.group(1)) if found else None
    if not finished:
      comp.signal(signal.SIGKILL)
      comp.reap(_GRACE)
      self._stop_run()
      raise DeployError(f"flwr run did not finish within {timeout:g} s\n{self.tails()}")
    if comp.proc.returncode != 0:
      raise DeployError(f"flwr run exited with code {comp.proc.returncode}\n{self.tails()}")
    if not status_path.exists():
      raise DeployError(f"flwr run finished but the ServerApp wrote no {status_path} (it did "
                        f"not start or was killed)\n{self.tails()}")
    status = json.loads(status_path.read_text())
    if status.get("status") != "ok":
      raise DeployError(f"the ServerApp failed: {status.get('error')}\n{self.tails()}")
    return {**status, "seconds": seconds}

  def kill_coordinator(self) -> bool:
    """Kills the running ServerApp (a coordinator crash) and has the SuperLink end its run at
    once, as an operator would (it would otherwise wait for the dead ServerApp's heartbeat
    to lapse); the `run` in progress then raises. False if no ServerApp was running."""
    killed = False
    for line in tagged_processes(self.tag):
      if "flwr-serverapp" in line:
        try:
          os.kill(int(line.split()[0]), signal.SIGKILL)
          killed = True
        except ProcessLookupError:
          pass
    runs = sorted(self.logs.glob("flwr-run-*.log"), key=lambda p: p.stat().st_mtime)
    found = _RUN_ID.search(runs[-1].read_text(errors="replace")) if runs else None
    if found:
      self.last_run_id = int(found.group(1))
      self._stop_run()
    return killed

  def _stop_run(self) -> None:
    """Asks the SuperLink to stop the last run: killing `flwr run` leaves its ServerApp
    running, and it would compete with the next run for the same SuperNodes."""
    if self.last_run_id is None:
      return
    try:
      subprocess.run([_tool("flwr"), "stop", str(self.last_run_id), CONNECTION],
                     env=self._env(self.home), cwd=str(self.home), timeout=30,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
      self._log(f"flwr stop {self.last_run_id} did not answer within 30 s")

  def kill_site(self, name: str, sig: int = signal.SIGKILL) -> None:
    """Kills site `name`'s SuperNode (with its SuperExec and ClientApp processes) and its
    worker, and reaps them. SIGKILL (the default) is a crash: the SuperLink notices only when
    the node's heartbeat lapses; SIGTERM lets the node sign off first."""
    if name not in self.site_dirs:
      raise DeployError(f"kill_site: no site {name!r} (sites: {', '.join(self.site_dirs)})")
    comps = [self._procs[n] for n in (f"supernode-{name}", f"worker-{name}")
             if n in self._procs]
    for comp in comps:
      comp.signal(sig)
    for comp in comps:
      if not comp.reap(_GRACE):
        comp.signal(signal.SIGKILL)
        comp.reap(_GRACE)

  # -- teardown ---------------------------------------------------------------------------

  def stop(self) -> float:
    """Ends every process this deployment started (SIGTERM, SIGKILL after a grace period,
    then a sweep of anything still carrying its tag) and reaps them; returns the seconds it
    took. Safe to call twice."""
    start = time.monotonic()
    ran = any(c.alive() for c in self._procs.values())
    # everything else first, so that the SuperNodes can sign off while the SuperLink listens
    link = [c for c in self._procs.values() if c.name == "superlink"]
    for phase in ([c for c in self._procs.values() if c.name != "superlink"], link):
      self._terminate([c for c in phase if c.alive()])
    # Flower's detached children (the SuperLink's SuperExec) leave on their own once their
    # parent is gone; give them a moment, then kill what is left
    deadline = time.monotonic() + _GRACE
    while tagged_processes(self.tag) and time.monotonic() < deadline:
      time.sleep(0.1)
    for line in tagged_processes(self.tag):
      self._log(f"killing leftover process {line}")
      try:
        os.kill(int(line.split()[0]), signal.SIGKILL)
      except ProcessLookupError:
        pass
    for comp in self._procs.values():
      comp.close()
    seconds = time.monotonic() - start
    if ran:
      self.timings["teardown_s"] = seconds
    return seconds

  def _terminate(self, comps: list[_Component]) -> None:
    """SIGTERM to each component's process group; SIGKILL to those still running after
    the grace period; reaps them all."""
    for comp in comps:
      comp.signal(signal.SIGTERM)
    deadline = time.monotonic() + _GRACE
    while any(c.alive() for c in comps) and time.monotonic() < deadline:
      time.sleep(0.05)
    for comp in comps:
      if comp.alive():
        self._log(f"{comp.name} still runs {_GRACE:g} s after SIGTERM; killing it")
        comp.signal(signal.SIGKILL)
    for comp in comps:
      comp.reap(_GRACE)

  def leftovers(self) -> list[str]:
    """Processes of this deployment still alive ('pid command line'); [] after stop()."""
    return tagged_processes(self.tag)

  def tails(self, names: list[str] | None = None, lines: int = 15) -> str:
    """The last `lines` lines of each component's log (all components by default)."""
    out = []
    for name in names or list(self._procs):
      comp = self._procs.get(name)
      if comp is not None:
        text = _ANSI.sub("", comp.text()).splitlines()[-lines:]
        out.append(f"--- {comp.log_path} (last {len(text)} lines)\n" + "\n".join(text))
    return "\n".join(out)

  def __enter__(self) -> LocalDeployment:
    return self.start()

  def __exit__(self, *exc) -> None:
    self.stop()
