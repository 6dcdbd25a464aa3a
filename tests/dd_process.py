"""The `dd` CLI in subprocesses, as the resume and torchrun tests run it."""
import os
import subprocess
import sys
import time

from distilled_decoding.distributed import torchrun_argv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def dd_command(*args, torchrun: int = 0) -> list:
    """`python -m distilled_decoding ARGS`, or with `torchrun` > 0 the command line `dd demo --procs`
    runs: torchrun on that many local CPU ranks."""
    if torchrun:
        return torchrun_argv(torchrun, args)
    return [sys.executable, "-m", "distilled_decoding", *map(str, args)]


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


def tree_digest(root) -> dict:
    """{relative path: sha256} of every file under `root` (missing root: {}): what a refused command
    must leave exactly as it was."""
    import hashlib
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def assert_refused(*args, names: str, watch=(), timeout: float = 180, **kw) -> str:
    """Run `dd ARGS` and assert the bad-input contract: non-zero exit, exactly one non-empty line on
    stderr, no traceback, the line mentions `names` (the file / option / key at fault), and no file
    under any folder in `watch` changed, appeared or vanished. Returns the line."""
    before = {str(w): tree_digest(w) for w in watch}
    proc = run_dd(*args, timeout=timeout, **kw)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode != 0, f"exit 0 for {args}; stderr: {proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{proc.stderr}"
    assert names in lines[0], f"{names!r} not named in: {lines[0]}"
    for w in watch:
        assert tree_digest(w) == before[str(w)], f"{w} changed although the command was refused"
    return lines[0]
