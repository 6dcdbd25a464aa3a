"""`dd build-dataset` and the pair data set: per-sample determinism, byte-identical resume and
multi-rank builds, corruption and settings checks, and PairDataset round trips.

Tiny random teachers of both families are saved to checkpoint files, so CLI subprocesses load
exactly the teacher the in-process reference builds use.
"""
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from distilled_decoding.dataset import PairDataset
from distilled_decoding.dataset_check import dataset_info, verify_dataset
from distilled_decoding.dataset_build import build_dataset
from distilled_decoding.pairs import DatasetError, generate_pairs, read_manifest
from distilled_decoding.seeding import sample_labels, sample_noise
from distilled_decoding.shard_store import shard_name
from distilled_decoding.flowmap import FlowMapConfig
from distilled_decoding.teacher_spec import TeacherSpec, parse_config, resolve_sampling
from dd_process import kill_after, run_dd as cli

FM = FlowMapConfig(nfe=4)


def build(out, teacher, spec, **kw):
    args = dict(num_samples=14, sampling=resolve_sampling(teacher), fm_config=FM, seed=3, shard_size=6,
                batch_size=4, show_progress=False, log=lambda s: None)
    args.update(kw)
    return build_dataset(str(out), teacher, spec, **args)


def shard_bytes(d):
    names = sorted(f for f in os.listdir(d) if f.startswith("shard-"))
    return {f: (d / f).read_bytes() for f in names}


def teacher_args(spec):
    return ["--teacher", spec.teacher, "--config", json.dumps(spec.config), "--checkpoint", spec.checkpoint,
            "--tokenizer-config", json.dumps(spec.tokenizer_config), "--tokenizer-checkpoint",
            spec.tokenizer_checkpoint, "--nfe", FM.nfe]


# ---- per-sample randomness --------------------------------------------------------------------------
def test_noise_and_labels_depend_only_on_seed_and_index():
    full = sample_noise(7, torch.arange(10), 5, 3)
    assert full.shape == (10, 5, 3) and full.dtype == torch.float32
    assert torch.equal(sample_noise(7, [8, 2], 5, 3), full[[8, 2]])
    assert not torch.equal(sample_noise(8, [2], 5, 3), full[[2]])
    assert abs(float(sample_noise(0, range(200), 4, 4).std()) - 1) < 0.05
    bal = sample_labels(7, torch.arange(30), 10, balanced=True)
    for b in range(3):                               # each block of num_classes holds every class once
        assert sorted(bal[10 * b:10 * b + 10].tolist()) == list(range(10))
    assert not torch.equal(bal[:10], bal[10:20])     # blocks are shuffled independently
    assert torch.equal(sample_labels(7, [25, 3], 10, True), bal[[25, 3]])
    uni = sample_labels(7, torch.arange(300), 10, balanced=False)
    assert uni.min() >= 0 and uni.max() < 10 and len(set(uni.tolist())) == 10
    assert torch.equal(sample_labels(7, [299, 0], 10, False), uni[[299, 0]])


# ---- the teacher spec -----------------------------------------------------------------------------
def test_teacher_spec_round_trip_and_config_parsing(tmp_path):
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps({"dim": 8}))
    assert parse_config(str(p)) == {"dim": 8}
    assert parse_config('{"depth": 2}') == {"depth": 2}
    assert parse_config("GPT-L") == "GPT-L"
    with pytest.raises(ValueError, match="JSON"):
        parse_config("{depth")
    spec = TeacherSpec("var", '{"depth": 2}', "rel/ck.pt", None, None, dtype="bfloat16", ema=True)
    assert spec.config == {"depth": 2} and os.path.isabs(spec.checkpoint)
    assert TeacherSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="dtype"):
        TeacherSpec("var", dtype="int8")


def test_sampling_defaults_come_from_the_teacher(tiny_teacher):
    _, t = tiny_teacher
    assert resolve_sampling(t) == t.default_sampling and t.default_sampling.cfg_scale == 2.0
    s = resolve_sampling(t, {"top_k": 5, "top_p": None})
    assert s.top_k == 5 and s.top_p == t.default_sampling.top_p


# ---- determinism, extension, reading ----------------------------------------------------------------
def test_generate_pairs_and_shards_independent_of_batch_size(tiny_teacher, tmp_path):
    spec, t = tiny_teacher
    idx = torch.arange(5)
    eps = sample_noise(0, idx, t.num_tokens, t.embed_dim)
    labels = sample_labels(0, idx, t.num_classes, True)
    s = resolve_sampling(t)
    whole = generate_pairs(t, labels, eps, s, FM)
    assert whole.shape == (5, t.num_tokens) and whole.dtype == torch.long
    ones = torch.cat([generate_pairs(t, labels[i:i + 1], eps[i:i + 1], s, FM) for i in range(5)])
    assert torch.equal(whole, ones)
    m1 = build(tmp_path / "b1", t, spec, batch_size=1)
    m6 = build(tmp_path / "b6", t, spec, batch_size=6)
    assert m1["complete"] and [e["count"] for e in m1["shards"]] == [6, 6, 2]
    assert shard_bytes(tmp_path / "b1") == shard_bytes(tmp_path / "b6")
    assert m1["shards"] == m6["shards"]


def test_extend_equals_direct_build(tiny_teacher, tmp_path):
    spec, t = tiny_teacher
    build(tmp_path / "ext", t, spec, num_samples=8)
    m = build(tmp_path / "ext", t, spec, num_samples=14)      # shard 1 grows from 2 to 6 samples
    direct = build(tmp_path / "direct", t, spec, num_samples=14)
    assert m["shards"] == direct["shards"] and m["num_samples"] == 14
    assert shard_bytes(tmp_path / "ext") == shard_bytes(tmp_path / "direct")
    with pytest.raises(DatasetError, match="shrink"):
        build(tmp_path / "ext", t, spec, num_samples=8)


def test_rebuilding_a_complete_set_writes_nothing(tiny_teacher, tmp_path):
    """Training runs record manifest.json's sha256: a no-op re-run must not rewrite it."""
    spec, t = tiny_teacher
    build(tmp_path / "d", t, spec, num_samples=8)
    before = (tmp_path / "d" / "manifest.json").read_bytes()
    again = build(tmp_path / "d", t, spec, num_samples=8)
    assert (tmp_path / "d" / "manifest.json").read_bytes() == before and again["complete"]
    assert not (tmp_path / "d" / ".progress").exists()


@pytest.mark.parametrize("store_noise", [False, True])
def test_pair_dataset_returns_build_noise_and_tokens(tiny_teacher, tmp_path, store_noise):
    spec, t = tiny_teacher
    build(tmp_path, t, spec, store_noise=store_noise)
    ds = PairDataset(tmp_path)
    assert len(ds) == 14 and ds.teacher_spec == spec
    it = ds[9]
    assert it["noise"].shape == (t.num_tokens, t.embed_dim) and it["noise"].dtype == torch.float32
    assert it["tokens"].dtype == torch.long and it["label"].dtype == torch.long and int(it["index"]) == 9
    assert torch.equal(it["noise"], sample_noise(3, [9], t.num_tokens, t.embed_dim)[0])
    assert int(it["label"]) == int(sample_labels(3, [9], t.num_classes, True)[0])
    # the stored tokens are what the teacher + flow map make from this very noise and label
    items = [ds[i] for i in (0, 5, 6, 13)]
    again = generate_pairs(t, torch.stack([x["label"] for x in items]), torch.stack([x["noise"] for x in items]),
                           resolve_sampling(t), FM)
    assert torch.equal(again, torch.stack([x["tokens"] for x in items]))
    # shuffled, sharded loading across two replicas covers every pair once
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=0)
        for batch in DataLoader(ds, batch_size=4, sampler=sampler):
            assert batch["noise"].shape[1:] == (t.num_tokens, t.embed_dim)
            seen += batch["index"].tolist()
    assert sorted(seen) == list(range(14))


# ---- corruption and settings ----------------------------------------------------------------------
def test_corrupt_shard_is_named(tiny_teacher, tmp_path):
    spec, t = tiny_teacher
    build(tmp_path, t, spec)
    assert verify_dataset(str(tmp_path), log=lambda s: None) == []
    p = tmp_path / shard_name(1)
    data = bytearray(p.read_bytes())
    data[-3] ^= 0x01                                 # one bit of one stored value
    p.write_bytes(bytes(data))
    problems = verify_dataset(str(tmp_path), log=lambda s: None)
    assert len(problems) == 1 and "shard-00001.safetensors" in problems[0] and "sha256" in problems[0]
    with pytest.raises(DatasetError, match="shard-00001.safetensors"):
        PairDataset(tmp_path, verify=True)
    PairDataset(tmp_path)                            # without verify only sizes and headers are checked
    p.write_bytes(bytes(data[:-10]))
    with pytest.raises(DatasetError, match="shard-00001.safetensors.*truncated"):
        PairDataset(tmp_path)
    data[9] = ord("#")                               # inside the JSON header
    p.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="shard-00001.safetensors.*parse"):
        PairDataset(tmp_path)


def test_other_settings_refused_and_nothing_lost(tiny_teacher, tmp_path):
    spec, t = tiny_teacher
    build(tmp_path, t, spec)
    before = shard_bytes(tmp_path)
    with pytest.raises(DatasetError, match=r"flow_map\.nfe: 4 .* vs 5 now"):
        build(tmp_path, t, spec, fm_config=FlowMapConfig(nfe=5))
    with pytest.raises(DatasetError, match=r"sampling\.top_k") as e:
        build(tmp_path, t, spec, sampling=resolve_sampling(t, {"top_k": 3}), labels="uniform")
    assert "labels: 'balanced'" in str(e.value) and "flow_map" not in str(e.value)
    build(tmp_path, t, spec, fm_config=FlowMapConfig(nfe=4, mem_budget_mb=1.0))  # memory is not a data setting
    assert shard_bytes(tmp_path) == before


def test_manifest_from_before_grid_scale_reads_as_the_old_map(tiny_teacher, tmp_path):
    """A manifest written before FlowMapConfig.grid_scale existed was built with the "unit" grid: it reads
    (and reports) as that, completes with it, recomputes its tokens with it, and refuses the new default."""
    spec, t = tiny_teacher
    old_map = FlowMapConfig(nfe=4, grid_scale="unit")
    build(tmp_path, t, spec, fm_config=old_map)
    m = json.loads((tmp_path / "manifest.json").read_text())
    for d in (m["settings"]["flow_map"], m["build"]["flow_map"]):
        del d["grid_scale"]
    del m["settings_sha256"]          # nor did manifests of that time record a settings hash
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    before = shard_bytes(tmp_path)
    assert dataset_info(str(tmp_path))["flow_map"]["grid_scale"] == "unit"
    assert verify_dataset(str(tmp_path), recompute=4, log=lambda s: None) == []
    build(tmp_path, t, spec, fm_config=old_map)                       # nothing to do: same settings
    with pytest.raises(DatasetError, match=r"flow_map\.grid_scale: 'unit' .* vs 'codebook' now"):
        build(tmp_path, t, spec)
    assert shard_bytes(tmp_path) == before


def test_verify_recompute_catches_wrong_tokens(tiny_teacher, tmp_path):
    """A data set whose hashes are consistent but whose tokens are not the teacher's is caught."""
    from safetensors.torch import load_file, save_file
    from teachers.checkpoint import file_sha256
    spec, t = tiny_teacher
    build(tmp_path, t, spec)
    assert verify_dataset(str(tmp_path), recompute=14, log=lambda s: None) == []
    p = tmp_path / shard_name(0)
    tensors = load_file(p)
    tensors["tokens"][2, -1] = (tensors["tokens"][2, -1] + 1) % t.vocab_size
    save_file(tensors, p, metadata={"format": "dd-pairs/1"})
    m = read_manifest(str(tmp_path))
    m["shards"][0].update(bytes=p.stat().st_size, sha256=file_sha256(p))
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    problems = verify_dataset(str(tmp_path), recompute=14, log=lambda s: None)
    assert problems == ["sample 2: recomputed tokens differ from the stored ones"]


# ---- the CLI: resume after a kill, torchrun, verify/info ---------------------------------------------
def test_cli_kill_resume_byte_identical(tiny_teacher, tmp_path):
    spec, t = tiny_teacher
    ref = tmp_path / "ref"
    m_ref = build(ref, t, spec, num_samples=48, shard_size=2, batch_size=2)
    out = tmp_path / "out"
    args = ["build-dataset", "--out", out, "--num-samples", 48, "--shard-size", 2, "--batch-size", 2,
            "--seed", 3, "--device", "cpu", "--no-progress", *teacher_args(spec)]
    proc = kill_after(out / ".progress" / "shard-00000.json", *args)   # written right after shard 0 itself
    done = os.listdir(out / ".progress")
    assert 1 <= len(done) < 24, f"the kill did not land mid-run ({len(done)} shards): {proc.stderr.read()}"
    assert not read_manifest(str(out))["complete"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert f"{len(done)} done" in r.stdout
    assert shard_bytes(out) == shard_bytes(ref)
    m = read_manifest(str(out))
    assert m["complete"] and m["shards"] == m_ref["shards"] and m["settings"] == m_ref["settings"]
    assert not [f for f in os.listdir(out) if ".tmp." in f]
    manifest_bytes = (out / "manifest.json").read_bytes()
    r = cli(*args)                                   # a finished data set: nothing to do, nothing changes
    assert r.returncode == 0 and "nothing to build" in r.stdout and shard_bytes(out) == shard_bytes(ref)
    assert (out / "manifest.json").read_bytes() == manifest_bytes


def test_torchrun_two_ranks_equal_one(tiny_teacher, tmp_path):
    spec, t = tiny_teacher
    ref = tmp_path / "ref"
    m_ref = build(ref, t, spec, num_samples=22, shard_size=4, batch_size=3)
    out = tmp_path / "out"
    r = cli("build-dataset", "--out", out, "--num-samples", 22, "--shard-size", 4, "--batch-size", 3, "--seed", 3,
            "--device", "cpu", "--no-progress", *teacher_args(spec), torchrun=2)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "on 2 ranks" in r.stdout
    m = read_manifest(str(out))
    assert m["build"]["world_size"] == 2 and m["complete"]
    assert m["shards"] == m_ref["shards"]
    assert shard_bytes(out) == shard_bytes(ref)


@pytest.mark.parametrize("tiny_teacher", ["llamagen"], indirect=True)  # the CLI plumbing is family-blind
def test_cli_verify_info_and_mismatch(tiny_teacher, tmp_path):
    spec, t = tiny_teacher
    build(tmp_path, t, spec)
    r = cli("dataset", "verify", tmp_path, "--recompute", 4, "--device", "cpu")
    assert r.returncode == 0 and "recomputed 4 samples: 4 identical" in r.stdout and r.stdout.strip().endswith("OK")
    r = cli("dataset", "info", tmp_path, "--json")
    info = json.loads(r.stdout)
    assert info["num_samples"] == 14 and info["complete"] and info["teacher"]["family"] == spec.teacher
    r = cli("build-dataset", "--out", tmp_path, "--num-samples", 14, "--shard-size", 6, "--seed", 3,
            "--device", "cpu", "--top-k", 7, *teacher_args(spec))
    assert r.returncode != 0 and "sampling.top_k" in r.stderr and "other settings" in r.stderr
    p = tmp_path / shard_name(2)
    data = bytearray(p.read_bytes())
    data[-1] ^= 0x40
    p.write_bytes(bytes(data))
    r = cli("dataset", "verify", tmp_path)
    assert r.returncode == 1 and "shard-00002.safetensors is corrupt" in r.stderr
