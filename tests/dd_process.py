"""The `dd` CLI in subprocesses, as the resume and torchrun tests run it."""
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dd_command(*args, torchrun: int = 0) -> list:
    """`python -m distilled_decoding ARGS`, under torchrun with `torchrun` CPU ranks when > 0 (`--`
    keeps torchrun's own argparse from taking options such as --run for its --run-path)."""
    pre = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}"] if torchrun else [sys.executable]
    return [*pre, "-m", "distilled_decoding", *(["--"] if torchrun else []), *map(str, args)]


def run_dd(*args, torchrun: int = 0, env=None, timeout: float = 180, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(dd_command(*args, torchrun=torchrun), cwd=ROOT, env=dict(ENV, **(env or {})),
                          capture_output=True, text=True, timeout=timeout, **kw)


def kill_after(path, *args, timeout: float = 120) -> subprocess.Popen:
    """Start `dd ARGS`, SIGKILL it as soon as `path` exists (or it ended, or `timeout` passed);
    returns the finished process (its stderr is readable)."""
    proc = subprocess.Popen(dd_command(*args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    return proc
