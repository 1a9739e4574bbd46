"""A throw-away single-node Slurm cluster (munged + slurmctld + slurmd) living in one temp directory.

Everything is private to the directory: its own munge key and socket, its own ``slurm.conf`` (pointed at by
``SLURM_CONF``), free TCP ports, state/spool/log dirs. Nothing under /etc is read or written, so it can run
next to a system Slurm. The daemons run in the foreground as children of this process and ``stop()``
kills them (and anything left in their process groups).

    with SlurmCluster(tmp_dir) as c:
        job = c.sbatch(["launch/pretrain.sh", ...])
        c.wait(job, {"COMPLETED"})

Manual use: ``python -m tests.slurm.cluster /tmp/slurm`` starts one and prints the environment to source.
"""
from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def _find(binary: str) -> str | None:
    return shutil.which(binary) or next((p for d in ("/usr/sbin", "/usr/bin", "/usr/local/sbin")
                                         if os.access(p := f"{d}/{binary}", os.X_OK)), None)


# The one line a run without Slurm prints (tests/slurm/conftest.py); .ci/run installs the packages.
HOW_TO_ENABLE = "install slurm-wlm and munge (as .ci/run does: sudo apt-get install slurm-wlm munge)"


def missing_binaries() -> list[str]:
    """The Slurm/munge programs the cluster needs that are not installed (empty when all are)."""
    return [b for b in DAEMONS + ("sbatch",) if not _find(b)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, root: str | Path, cpus: int = 8, kill_wait: int = 30, cred_expire: int = 5):
        # cred_expire is also how long a requeued job waits before it may start again (Slurm's default: 120 s).
        # Once that wait is over no event wakes the scheduler: the job starts on the next periodic pass, which
        # is why slurm.conf sets sched_interval/bf_interval to 1 s (defaults 60/30 s: a requeue took ~30 s).
        self.root = Path(root)
        self.cpus, self.kill_wait, self.cred_expire = cpus, kill_wait, cred_expire
        self.node = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.socket = self.root / "munge" / "munge.socket"

    # ---- set-up -------------------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in ("etc", "munge", "state", "spool", "log", "run"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(128))
        os.chmod(key, 0o400)
        ctld_port, d_port = _free_port(), _free_port()
        # FirstJobId: a fresh range each time, so runs/<job name>-<job id> of an earlier session never matches.
        self.conf.write_text(f"""\
ClusterName=phsatest
FirstJobId={random.randint(100_000, 900_000)}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire={self.cred_expire}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=600
KillWait={self.kill_wait}
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
        (r / "etc" / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nConstrainCores=no\nConstrainRAMSpace=no\n"
                                               "ConstrainDevices=no\nConstrainSwapSpace=no\n")

    @property
    def env(self) -> dict:
        """Environment for Slurm client commands (and the jobs they submit, which inherit it)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        self._write_config()
        m = self.root / "munge"
        self._spawn("munged", [_find("munged"), "--foreground", "--force", f"--socket={self.socket}",
                               f"--key-file={m}/munge.key", f"--pid-file={m}/munged.pid",
                               f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"])
        self._until(lambda: self.socket.exists(), 10, "munged did not create its socket")
        self._spawn("slurmctld", [_find("slurmctld"), "-D", "-c", "-i", "-f", str(self.conf)])
        self._until(lambda: self.run(["scontrol", "ping"], check=False).returncode == 0, timeout,
                    "slurmctld did not answer scontrol ping")
        self._spawn("slurmd", [_find("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._until(self._node_ready, timeout, "the node did not become idle")
        return self

    def _node_ready(self) -> bool:
        p = self.run(["sinfo", "-h", "-n", self.node, "-o", "%t"], check=False)
        return p.returncode == 0 and p.stdout.strip() in ("idle", "mix", "alloc")

    def _until(self, cond, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode}:\n{self.logs()}")
            if cond():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout:.0f}s:\n{self.logs()}")

    def logs(self, tail: int = 3000) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")) + [self.root / "munge" / "munged.log"]:
            if f.exists():
                out.append(f"--- {f.name}\n{f.read_text(errors='replace')[-tail:]}")
        return "\n".join(out)

    # ---- tear-down ----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel jobs, stop the daemons, and kill every process any job left behind. Never raises."""
        try:
            self.run(["scancel", "--full", "--user", pwd.getpwuid(os.getuid()).pw_name], check=False, timeout=10)
        except Exception:
            pass
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired, PermissionError):
                    pass
        # slurmstepd and the job processes under it live outside the daemons' process groups.
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.procs.values():
            try:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)
            except Exception:
                pass

    def _leftover_pids(self) -> list[int]:
        """Processes of this cluster: the daemons, their slurmstepds (slurmd double-forks them, so they are
        found by the cluster's SLURM_CONF in their environment), and every descendant of those."""
        own = {p.pid for p in self.procs.values()}
        parents, marked = {}, set()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                environ = (d / "environ").read_bytes()
                cmdline = (d / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            pid = int(d.name)
            parents[pid] = ppid
            if pid in own or (cmdline.startswith(b"slurmstepd") and str(self.conf).encode() in environ):
                marked.add(pid)
        changed = True
        while changed:  # close over descendants
            changed = False
            for pid, ppid in parents.items():
                if ppid in marked and pid not in marked:
                    marked.add(pid)
                    changed = True
        marked.discard(os.getpid())
        ancestors, p = set(), os.getpid()
        while p in parents and p not in ancestors:  # never our own ancestors (pytest, its shell)
            ancestors.add(p)
            p = parents[p]
        return sorted(marked - ancestors)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    # ---- client helpers -----------------------------------------------------------------------------
    def run(self, cmd: list[str], *, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {p.stdout}{p.stderr}")
        return p

    def sbatch(self, args: list[str], **kw) -> int:
        out = self.run(["sbatch", "--parsable", *args], **kw).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict ({} once the job is forgotten)."""
        p = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if p.returncode != 0:
            return {}
        fields = {}
        for tok in p.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def state(self, job_id: int) -> str:
        return self.job(job_id).get("JobState", "UNKNOWN")

    def wait(self, job_id: int, states: set[str], timeout: float = 300, poll: float = 0.5) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            s = self.state(job_id)
            if s in states:
                return s
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s (now {self.state(job_id)}):\n"
                           f"{self.job(job_id)}\n{self.logs()}")


if __name__ == "__main__":
    if missing := missing_binaries():
        sys.exit(f"Slurm is not installed (missing {', '.join(missing)}): {HOW_TO_ENABLE}")
    c = SlurmCluster(sys.argv[1] if len(sys.argv) > 1 else "/tmp/phsa-slurm").start()
    print(f"export SLURM_CONF={c.conf}\n# Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        c.stop()
