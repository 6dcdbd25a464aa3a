"""Fixtures shared by every test module: one thread per test process, and the tiny random teachers
of both families saved to checkpoint files (so CLI subprocesses load exactly the teacher the
in-process references use)."""
import pytest
import torch

from tiny_teachers import TINY, saved_teacher


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny ops on a 2-core CI machine: extra OpenMP threads only add contention (results are the
    same; every test module runs single-threaded and restores the setting afterwards)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_teachers(tmp_path_factory):
    """get(family, seed=0, edit=None, tag=None) -> (TeacherSpec, teacher freshly loaded from the files).

    The checkpoint files of each (family, seed, tag) are written once per session; every call loads
    a new teacher from them, so no test sees another's changes. `edit` (applied before saving) must
    be named by `tag`."""
    files = {}

    def get(family, seed=0, edit=None, tag=None):
        if edit is not None and tag is None:
            raise ValueError("name the edit with tag=...")
        key = (family, seed, tag)
        if key not in files:
            files[key] = saved_teacher(family, tmp_path_factory.mktemp(f"tiny-{family}-{seed}-{tag or 'plain'}"),
                                       seed=seed, edit=edit)[0]
        spec = files[key]
        return spec, spec.load("cpu")

    return get


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_teacher(request, tiny_teachers):
    """(spec, teacher) of the tiny random teacher of each family; narrow it to one family with
    `@pytest.mark.parametrize("tiny_teacher", ["llamagen"], indirect=True)`."""
    return tiny_teachers(request.param)


@pytest.fixture(scope="module")
def ard_trajectories(tmp_path_factory):
    """A folder holding `traj`: a DDIM-8 trajectory set (S = 4, 32 trajectories) of the zoo's digits-dit
    (depth 4, 16x16x1), for the ARD training tests."""
    from distilled_decoding.teacher_spec import TeacherSpec
    from distilled_decoding.trajectories import build_trajectories
    root = tmp_path_factory.mktemp("ard")
    spec = TeacherSpec("digits-dit")
    build_trajectories(str(root / "traj"), spec.load("cpu", diffusion=True), spec, num_samples=32, steps=8,
                       num_steps=4, shard_size=16, batch_size=16, show_progress=False, log=lambda s: None)
    return root
