"""DD2's AR-diffusion (GTS) initialisation (csd.gts_loss, gts_train.py, the "ar_diffusion" generator): the
loss vanishes at the analytic target, a tiny `dd csd init` lowers it and resumes bit for bit, and
`dd csd train --init-run GTS` starts the generator as x = ε − v_GTS(ε, τ = 1, shifted ε) and the guidance
network as the GTS model (and --init-run CSD_RUN, the performance alignment, from that run's EMA generator and
guidance network)."""
from __future__ import annotations

import json

import pytest
import torch

from distilled_decoding.csd import diffuse, gts_loss, gts_target, score_from_velocity
from distilled_decoding.csd_nets import LOGIT_EPS, shift_steps
from distilled_decoding.csd_train import CSDTrainArgs, train_csd
from distilled_decoding.dataset_build import build_dataset
from distilled_decoding.dd2_score import conditional_score, conditional_velocity
from distilled_decoding.flowmap import FlowMapConfig
from distilled_decoding.gts_train import GTSInitArgs, train_gts
from distilled_decoding.run_dir import latest_checkpoint
from distilled_decoding.samplers import dd_sample
from distilled_decoding.student import build_student
from distilled_decoding.student_run import load_run
from distilled_decoding.teacher_spec import resolve_sampling
from teachers.checkpoint import load_safetensors


def _problem(seed=0, B=3, n=5, V=7, C=2):
    g = torch.Generator().manual_seed(seed)
    logp = torch.randn(B, n, V, generator=g).log_softmax(-1)
    logp[0, 0, :3] = -float("inf")                                 # some codes with p = 0
    cb = torch.nn.functional.normalize(torch.randn(V, C, generator=g), dim=-1)
    tau = torch.rand(B, n, generator=g) * 0.9 + 0.05
    tau[:, -1] = 1.0                                               # the generator's time
    x = torch.randn(B, n, C, generator=g)
    return x, tau, logp, cb


def test_gts_loss_is_zero_at_the_analytic_velocity_and_positive_off_it():
    x, tau, logp, cb = _problem()
    target = gts_target(x, tau, logp, cb)
    assert gts_loss(target, target).item() == 0.0
    assert gts_loss(target + 0.1, target).item() == pytest.approx(0.01 * x[0].numel(), rel=1e-5)
    # one source of truth: the velocity is the conditional score in the networks' parameterisation
    inner = tau < 1
    s = score_from_velocity(x, conditional_velocity(x, tau, logp, cb), tau)
    assert torch.allclose(s[inner], conditional_score(x, tau, logp, cb)[inner], atol=1e-5)
    # at τ = 1 the posterior is the prior: v = x − Σ p_j c_j
    prior = (logp.exp()[:, -1] @ cb)
    assert torch.allclose(target[:, -1], x[:, -1] - prior, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_pairs(tiny_teachers, tmp_path_factory):
    spec, teacher = tiny_teachers("llamagen")
    data = tmp_path_factory.mktemp("gts") / "pairs"
    build_dataset(str(data), teacher, spec, num_samples=32, sampling=resolve_sampling(teacher),
                  fm_config=FlowMapConfig(nfe=4), seed=0, shard_size=32, batch_size=32, show_progress=False,
                  log=lambda s: None)
    return spec, teacher, str(data)


def _gts_args(data, out, **kw) -> GTSInitArgs:
    base = dict(data=data, out=str(out), batch_size=8, lr=1e-2, head_width=32, max_steps=20, ckpt_every=10,
                log_every=1, num_workers=0, ema_decay=0.5, progress=False, device="cpu", draws=2,
                freeze_backbone_steps=2, tau_one=0.25)
    return GTSInitArgs(**{**base, **kw})


def _metrics(out) -> dict:
    with open(out / "metrics.jsonl") as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_gts_init_learns_resumes_and_starts_both_csd_networks(tiny_pairs, tmp_path):
    spec, teacher, data = tiny_pairs
    whole = tmp_path / "whole"
    train_gts(_gts_args(data, whole), log=lambda s: None)
    rec = _metrics(whole)
    assert sorted(rec) == list(range(1, 21))
    # the GTS loss on fixed draws of the data set's sequences: the trained network's is below the fresh one's
    from distilled_decoding.csd_nets import teacher_logp
    from distilled_decoding.dataset import PairDataset
    items = [PairDataset(data)[i] for i in range(16)]
    tokens, labels = torch.stack([it["tokens"] for it in items]), torch.stack([it["label"] for it in items])
    g = torch.Generator().manual_seed(7)
    tau = torch.rand(tokens.shape, generator=g) * 0.9 + 0.05
    tau[:, ::4] = 1.0
    fresh = build_student(teacher, (1,), 0, output="ar_diffusion", head_width=32)
    trained, _ = load_run(str(whole), ema=False)
    x0 = fresh.codebook[tokens]
    x_tau = diffuse(x0, tau, torch.randn(x0.shape, generator=g))
    target = gts_target(x_tau, tau, teacher_logp(teacher, labels, tokens, resolve_sampling(teacher)), fresh.codebook)
    with torch.no_grad():
        fits = [gts_loss(m.backbone(x_tau, tau, x0, labels), target).item() for m in (fresh, trained)]
    assert fits[1] < 0.8 * fits[0], fits
    start = fresh.backbone.state_dict()
    raw = trained.backbone.state_dict()
    assert any(not torch.equal(raw[k], v) for k, v in start.items() if k.startswith("backbone."))   # unfrozen later

    part = tmp_path / "part"
    train_gts(_gts_args(data, part, max_steps=10), log=lambda s: None)
    logs = []
    train_gts(_gts_args(data, part, resume=True), log=logs.append)
    assert any("resumed from" in line for line in logs)
    again = _metrics(part)
    for step in range(11, 21):
        assert (again[step]["loss"], again[step]["one"]) == (rec[step]["loss"], rec[step]["one"]), step
    with pytest.raises(ValueError, match="tau_one"):
        train_gts(_gts_args(data, part, resume=True, max_steps=21, tau_one=0.5), log=lambda s: None)

    # the run is a generator: dd sample's one step is x = ε − v(ε, τ = 1, shifted ε), computed directly here
    gen, info = load_run(str(whole))
    assert info["method"] == "gts" and gen.config.output == "ar_diffusion"
    g = torch.Generator().manual_seed(3)
    eps = torch.randn(4, teacher.num_tokens, teacher.embed_dim, generator=g)
    labels = torch.tensor([0, 3, 5, 9])
    net = gen.backbone
    with torch.no_grad():
        h, _ = net.backbone.hidden(shift_steps(eps, teacher.step_sizes), labels,
                                   torch.ones(eps.shape[:2], dtype=torch.bool), block_causal=True)
        f = net.feature_norm(h[:, 1:])
        one = torch.ones(*eps.shape[:2], 1)
        logit = torch.full_like(one, float(torch.logit(torch.tensor(1.0 - LOGIT_EPS))))
        direct = eps - net.head(torch.cat([eps, one, logit, f], -1))
        x, _ = dd_sample(gen, eps, labels, (1,))
    assert (x - direct).abs().max() < 1e-5

    def frozen_step(name, **kw):
        """One `dd csd train` step at lr ~ 0 (one update changes nothing at fp32) into tmp_path/name."""
        out = tmp_path / name
        train_csd(CSDTrainArgs(out=str(out), teacher=spec.to_dict(), batch_size=4, lr=1e-30, guidance_lr=1e-30,
                               guidance_steps=1, guidance_warmup=0, max_steps=1, ckpt_every=1, num_workers=0,
                               ema_decay=0.5, progress=False, device="cpu", **kw), log=lambda s: None)
        return out

    def same(a, b):
        return all((a[k] - v).abs().max() < 1e-6 for k, v in b.items())

    # dd csd train --init-run GTS at step 0: both networks
    csd = frozen_step("csd", init_run=str(whole), head_width=8)
    start, cinfo = load_run(str(csd), ema=False)
    assert start.config.output == "ar_diffusion" and cinfo["train"]["head_width"] == 32
    with torch.no_grad():
        x0, _ = dd_sample(start, eps, labels, (1,))
    assert (x0 - direct).abs().max() < 1e-5
    guide = load_safetensors(f"{latest_checkpoint(str(csd))}/guidance.safetensors")
    ema = load_safetensors(whole / "student.safetensors")
    assert same(guide, ema)

    # performance alignment (App. C.3): --init-run a CSD run restarts from its EMA generator and its guidance network
    aligned = frozen_step("aligned", init_run=str(csd))
    assert same(load_safetensors(f"{latest_checkpoint(str(aligned))}/guidance.safetensors"), guide)
    assert same(load_safetensors(aligned / "student_raw.safetensors"), load_safetensors(csd / "student.safetensors"))

    # --guidance-init: the guidance network alone from the GTS run (here beside a fresh velocity generator)
    gonly = frozen_step("gonly", guidance_init=str(whole))
    assert same(load_safetensors(f"{latest_checkpoint(str(gonly))}/guidance.safetensors"), ema)
    assert load_run(str(gonly))[0].config.output == "velocity"


@pytest.mark.parametrize("tiny_teacher", ["var"], indirect=True)
def test_ar_diffusion_generator_on_var_reads_the_shifted_noise(tiny_teacher):
    _, teacher = tiny_teacher
    gen = build_student(teacher, (1,), 0, output="ar_diffusion", head_width=16, seed=2).eval()
    torch.nn.init.normal_(gen.backbone.head[-1].weight, std=0.1)        # a non-zero head
    eps, labels = torch.randn(2, teacher.num_tokens, teacher.embed_dim), torch.tensor([1, 4])
    with torch.no_grad():
        x, _ = dd_sample(gen, eps, labels, (1,))
        tau = torch.ones(eps.shape[:2])
        v = gen.backbone.head_velocity(eps, tau, gen.backbone.features(eps, labels))
        assert torch.allclose(x, eps - v, atol=1e-6)
        # token i's output reads ε_i and ε of earlier scales only: the last scale's noise moves only itself
        e2 = eps.clone()
        last = teacher.num_tokens - teacher.step_sizes[-1]
        e2[:, last:] += 1.0
        x2, _ = dd_sample(gen, e2, labels, (1,))
    assert torch.equal(x2[:, :last], x[:, :last])
    with pytest.raises(ValueError, match="one step"):
        gen(eps, labels, torch.tensor([2, 2]))


def test_two_rank_torchrun_matches_one_rank(tiny_pairs, tmp_path):
    """`dd csd init` on 2 torchrun ranks (gloo) logs the losses of one process and ends at its weights,
    through the head-only steps and after them (each sequence's τ and ε are its own)."""
    from dd_process import run_dd
    _, _, data = tiny_pairs
    base = ["csd", "init", "--data", data, "--batch-size", 8, "--lr", "1e-2", "--head-width", 32, "--max-steps", 4,
            "--log-every", 1, "--num-workers", 0, "--ema-decay", "0.5", "--draws", 2, "--freeze-backbone-steps", 2,
            "--tau-one", "0.25", "--no-progress", "--device", "cpu"]
    for name, procs in (("one", 0), ("two", 2)):
        proc = run_dd(*base, "--out", tmp_path / name, torchrun=procs)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 rank(s)" in proc.stdout + proc.stderr
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        for key in ("loss", "one", "grad_norm"):
            assert one[step][key] == pytest.approx(two[step][key], rel=1e-4), (step, key)
    a, b = (load_safetensors(f"{latest_checkpoint(str(tmp_path / n))}/model.safetensors") for n in ("one", "two"))
    for k in a:
        # Adam's per-entry normalisation turns the ranks' other rounding of a ~0 gradient into up to ~1e-4 of lr 1e-2
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)
