"""Incremental plug-and-play ADMM: operators, proximal steps, the iteration, denoisers, resume, bad input."""
from __future__ import annotations

import re
import sys

import numpy as np
import pytest
import torch
from torch import nn

import amstream
from amstream.reconstruction import (DenoiserRangeError, GaussianBlur, GaussianSensing, IdentityDenoiser,
                                     MissingExtraError, NetworkDenoiser, ParallelBeamCT, PnPADMM, TVDenoiser,
                                     back_projection, conjugate_gradient, dncnn, denoising_psnr, load_denoiser,
                                     load_test_image, load_training_images, psnr, random_patches, save_denoiser,
                                     train_denoiser)
from amstream.reconstruction.denoisers import tv_prox

F64 = torch.float64


def _operators(shape=(12, 10)):
    return [
        GaussianSensing(shape, 0.6, 4, seed=3, dtype=F64),
        GaussianSensing(shape, 1.5, 3, seed=4, dtype=F64),  # more rows than pixels
        ParallelBeamCT(shape, 9, 3, dtype=F64, cg_steps=200),
        ParallelBeamCT(shape, 7, 7, dtype=F64, cache_grids=False, cg_steps=200),
        GaussianBlur(shape, 1.3, 4, dtype=F64, cg_steps=200),
    ]


def _matrix(op, blocks=None) -> torch.Tensor:
    """The operator's rows for ``blocks`` as a dense matrix, built column by column from forward_block."""
    blocks = range(op.n_blocks) if blocks is None else blocks
    n = op.image_shape[0] * op.image_shape[1]
    columns = []
    for j in range(n):
        e = torch.zeros(n, dtype=F64)
        e[j] = 1
        image = e.reshape(op.image_shape)
        columns.append(torch.cat([op.forward_block(image, i).flatten() for i in blocks]))
    return torch.stack(columns, dim=1)


def _measure(op, image, noise=0.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [y + noise * torch.randn(y.shape, generator=generator, dtype=y.dtype).to(y.device) for y in op.forward(image)]


# ----------------------------------------------------------------------------------------- operators
@pytest.mark.parametrize("op", _operators(), ids=lambda op: op.describe())
def test_adjoint_is_the_transpose(op):
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(op.image_shape, generator=generator, dtype=F64)
        ys = [torch.randn(op.block_shape(i), generator=generator, dtype=F64) for i in range(op.n_blocks)]
        lhs = sum(torch.vdot(op.forward_block(x, i).flatten(), ys[i].flatten()) for i in range(op.n_blocks))
        rhs = torch.vdot(x.flatten(), op.adjoint(ys).flatten())
        assert float(lhs) == pytest.approx(float(rhs), rel=1e-12, abs=1e-12)
    assert sum(int(np.prod(op.block_shape(i))) for i in range(op.n_blocks)) == op.n_measurements


@pytest.mark.parametrize("op", _operators(), ids=lambda op: op.describe())
def test_prox_equals_a_dense_solve(op):
    generator = torch.Generator().manual_seed(1)
    v = torch.randn(op.image_shape, generator=generator, dtype=F64)
    ys = [torch.randn(op.block_shape(i), generator=generator, dtype=F64) for i in range(op.n_blocks)]
    for blocks, weight in (((1,), 0.7), (tuple(range(op.n_blocks)), 2.5), ((0, 2), 0.3)):
        a = _matrix(op, blocks)
        y = torch.cat([ys[i].flatten() for i in blocks])
        expected = torch.linalg.solve(torch.eye(a.shape[1], dtype=F64) + weight * a.T @ a, v.flatten() + weight * a.T @ y)
        got = op.prox(v, ys, blocks, weight)
        torch.testing.assert_close(got.flatten(), expected, rtol=1e-8, atol=1e-8)


def test_conjugate_gradient_solves_a_spd_system_and_stops_early():
    generator = torch.Generator().manual_seed(2)
    m = torch.randn(30, 30, generator=generator, dtype=F64)
    spd = m @ m.T + 30 * torch.eye(30, dtype=F64)
    rhs = torch.randn(30, generator=generator, dtype=F64)
    x = conjugate_gradient(lambda u: spd @ u, rhs, torch.zeros(30, dtype=F64), steps=60, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(spd, rhs))


def test_ct_matches_scikit_image_radon_and_keeps_mass():
    from skimage.transform import radon

    image = load_test_image("camera", 48).double()
    op = ParallelBeamCT((48, 48), 12, 1, dtype=F64)
    sinogram = op.forward(image)[0]
    theta = np.arange(12) * 180 / 12
    reference = radon(image.numpy(), theta=theta, circle=False).T
    assert sinogram.shape == reference.shape
    assert np.corrcoef(sinogram.numpy().ravel(), reference.ravel())[0, 1] > 0.975  # 0.81 with the angle mirrored
    # every projection is a line integral of the whole image: its sum is the image's sum (to the
    # accuracy of bilinear samples on a rotated unit lattice; exact at 0 and 90 degrees)
    torch.testing.assert_close(sinogram.sum(dim=1), image.sum().expand(12), rtol=2e-3, atol=0)
    torch.testing.assert_close(sinogram[[0, 6]].sum(dim=1), image.sum().expand(2), rtol=1e-12, atol=1e-9)


def test_gaussian_sensing_rows_are_normalized_and_blocks_partition_them():
    op = GaussianSensing((16, 16), 0.5, 5, seed=0, dtype=F64)
    rows = torch.cat(op.blocks)
    assert rows.shape == (128, 256) and [b.shape[0] for b in op.blocks] == [26, 26, 26, 25, 25]
    # E[A^T A] = I: the mean squared column norm is 1
    assert float((rows ** 2).sum(0).mean()) == pytest.approx(1.0, rel=0.05)
    same = GaussianSensing((16, 16), 0.5, 2, seed=0, dtype=F64)
    torch.testing.assert_close(torch.cat(same.blocks), rows)  # the matrix does not depend on the cut


# ----------------------------------------------------------------------------------------- PnP-ADMM
def test_full_pnp_with_identity_denoiser_is_the_proximal_point_iteration():
    image = load_test_image("phantom", 10).double()
    op = GaussianSensing((10, 10), 1.4, 4, seed=5, dtype=F64)
    ys = _measure(op, image, noise=0.01)
    a = _matrix(op)
    y = torch.cat([t.flatten() for t in ys])
    gamma = 0.8
    x = torch.zeros(100, dtype=F64)
    pnp = PnPADMM(op, IdentityDenoiser(), ys, gamma=gamma, sigma=0.1, mode="full", x0=torch.zeros(10, 10, dtype=F64))
    lhs = torch.eye(100, dtype=F64) + gamma * a.T @ a
    for _ in range(5):
        x = torch.linalg.solve(lhs, x + gamma * a.T @ y)
        pnp.step()
        torch.testing.assert_close(pnp.x.flatten(), x, rtol=1e-10, atol=1e-10)
    assert float(pnp.s.abs().max()) == 0.0  # the dual of an identity prior stays zero
    pnp.run(3000)  # the proximal point method converges to the least-squares solution
    torch.testing.assert_close(pnp.x.flatten(), torch.linalg.lstsq(a, y.unsqueeze(1)).solution.squeeze(1),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda b: GaussianSensing((12, 12), 0.5, b, dtype=F64),
                                  lambda b: ParallelBeamCT((12, 12), 8, b, dtype=F64)], ids=["cs", "ct"])
def test_incremental_with_one_block_equals_full(make):
    image = load_test_image("coins", 12).double()
    results = []
    for mode in ("full", "incremental"):
        op = make(1)
        pnp = PnPADMM(op, TVDenoiser(1.0, steps=20), _measure(op, image, 0.01), gamma=1.0, sigma=0.1, mode=mode)
        pnp.run(6)
        results.append(pnp.x)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    # and a mini-batch of every block is the full method too
    op = make(4)
    ys = _measure(op, image, 0.01)
    full = PnPADMM(op, TVDenoiser(1.0, steps=20), ys, gamma=1.0, sigma=0.1, mode="full")
    every = PnPADMM(op, TVDenoiser(1.0, steps=20), ys, gamma=1.0, sigma=0.1, mode="incremental", blocks_per_step=4)
    full.run(4)
    every.run(4)
    torch.testing.assert_close(full.x, every.x, rtol=0, atol=0)


def test_reconstruction_improves_psnr_over_the_back_projection():
    image = load_test_image("phantom", 32)
    op = ParallelBeamCT((32, 32), 18, 6)
    ys = _measure(op, image, noise=0.05, seed=1)
    bp = back_projection(op, ys)
    for mode in ("full", "incremental"):
        pnp = PnPADMM(op, TVDenoiser(2.0), ys, gamma=1.0, sigma=0.1, mode=mode, reference=image, seed=2)
        records = pnp.run(60 if mode == "full" else 240)
        assert records[-1].psnr == pytest.approx(psnr(pnp.x, image))
        assert records[-1].psnr > psnr(bp, image) + 6, (mode, records[-1].psnr, psnr(bp, image))
        assert records[-1].fixed_point_residual < records[0].fixed_point_residual


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    image = load_test_image("moon", 16)
    op = GaussianSensing((16, 16), 0.4, 8, seed=1)
    ys = _measure(op, image, 0.02)

    def make():
        return PnPADMM(op, TVDenoiser(1.0, steps=10), ys, gamma=1.0, sigma=0.1, mode="incremental",
                       blocks_per_step=2, seed=7)

    whole = make()
    whole.run(10)
    first = make()
    first.run(4)
    amstream.save_checkpoint(tmp_path / "pnp.pt", first)
    first.run(3)  # the interrupted run went on past its checkpoint
    resumed = make()
    amstream.load_checkpoint(tmp_path / "pnp.pt", resumed)
    records = resumed.run(6)
    assert records[-1].iteration == 10
    torch.testing.assert_close(resumed.x, whole.x, rtol=0, atol=0)
    torch.testing.assert_close(resumed.s, whole.s, rtol=0, atol=0)


def test_streaming_observe_equals_cyclic_incremental_and_keeps_no_block():
    image = load_test_image("coins", 16)
    op = ParallelBeamCT((16, 16), 12, 4)
    ys = _measure(op, image, 0.01)
    x0 = back_projection(op, ys)
    stored = PnPADMM(op, TVDenoiser(), ys, gamma=0.5, sigma=0.1, order="cyclic", x0=x0)
    stream = PnPADMM(op, TVDenoiser(), None, gamma=0.5, sigma=0.1, x0=x0)
    for k in range(8):
        stored.step()
        record = stream.observe(k % 4, ys[k % 4])
        assert record.blocks == (k % 4,)
    torch.testing.assert_close(stream.x, stored.x, rtol=0, atol=0)
    assert stream.measurements is None
    with pytest.raises(RuntimeError, match="observe"):
        stream.step()


def test_records_are_logged(tmp_path):
    from amstream.logging import TensorBoardLogger

    image = load_test_image("phantom", 16)
    op = GaussianSensing((16, 16), 0.5, 2)
    logger = TensorBoardLogger(tmp_path)
    PnPADMM(op, TVDenoiser(), _measure(op, image), gamma=1.0, sigma=0.1, reference=image).run(3, logger=logger)
    logger.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"pnp/psnr", "pnp/fixed_point_residual", "pnp/primal_residual"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("pnp/psnr")] == [1, 2, 3]


# ----------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_the_problem_named():
    image = load_test_image("phantom", 16)
    op = ParallelBeamCT((16, 16), 8, 2)
    ys = _measure(op, image)
    with pytest.raises(ValueError, match="3 measurement blocks given"):
        PnPADMM(op, TVDenoiser(), ys + [ys[0]], gamma=1.0, sigma=0.1)
    with pytest.raises(ValueError, match="block 1 have shape"):
        PnPADMM(op, TVDenoiser(), [ys[0], ys[1][:, :-1]], gamma=1.0, sigma=0.1)
    bad = [ys[0], ys[1].clone()]
    bad[1][0, 3] = float("nan")
    with pytest.raises(ValueError, match="block 1 contain 1 non-finite"):
        PnPADMM(op, TVDenoiser(), bad, gamma=1.0, sigma=0.1)
    with pytest.raises(ValueError, match=r"x0 has shape \(8, 8\)"):
        PnPADMM(op, TVDenoiser(), ys, gamma=1.0, sigma=0.1, x0=torch.zeros(8, 8))
    with pytest.raises(ValueError, match="image has shape"):
        op.forward(torch.zeros(16, 17))
    network = NetworkDenoiser(dncnn(4, 3), (0.02, 0.1))
    with pytest.raises(DenoiserRangeError, match=r"trained for noise levels sigma in \[0.02, 0.1\]"):
        PnPADMM(op, network, ys, gamma=1.0, sigma=0.3)
    stream = PnPADMM(op, TVDenoiser(), None, gamma=1.0, sigma=0.1)
    before = stream.state_dict()
    with pytest.raises(ValueError, match="block index 2"):
        stream.observe(2, ys[0])
    with pytest.raises(ValueError, match="non-finite"):
        stream.observe(1, bad[1])
    assert stream.iteration == 0 and torch.equal(stream.x, before["x"])


def test_a_non_finite_iteration_and_a_foreign_state_change_nothing():
    image = load_test_image("phantom", 16)
    op = GaussianSensing((16, 16), 0.5, 4)
    ys = _measure(op, image)

    class Broken(IdentityDenoiser):
        def __call__(self, image, sigma):
            return image * float("nan")

    pnp = PnPADMM(op, Broken(), ys, gamma=1.0, sigma=0.1, seed=3)
    before = pnp.state_dict()
    with pytest.raises(FloatingPointError, match="iteration 1"):
        pnp.step()
    after = pnp.state_dict()
    assert torch.equal(after["x"], before["x"]) and torch.equal(after["generator"], before["generator"])
    other = PnPADMM(op, TVDenoiser(), ys, gamma=2.0, sigma=0.1)
    with pytest.raises(ValueError, match="another reconstruction"):
        pnp.load_state_dict(other.state_dict())
    other_data = PnPADMM(op, TVDenoiser(), [y * 1.5 for y in ys], gamma=1.0, sigma=0.1)
    with pytest.raises(ValueError, match="measurements_sum"):
        pnp.load_state_dict(other_data.state_dict())
    assert torch.equal(pnp.state_dict()["x"], before["x"])


# ----------------------------------------------------------------------------------------- denoisers
def test_tv_denoiser_is_the_tv_proximal_step():
    from skimage.restoration import denoise_tv_chambolle

    image = load_test_image("camera", 32).double()
    noisy = image + 0.1 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
    ours = tv_prox(noisy, 0.1, 400)
    reference = denoise_tv_chambolle(noisy.numpy(), weight=0.1, eps=1e-12, max_num_iter=400)
    assert np.abs(ours.numpy() - reference).max() < 5e-3
    assert psnr(TVDenoiser(tau=10.0, steps=100)(noisy.float(), 0.1), image.float()) > psnr(noisy, image) + 3


def test_dncnn_trains_with_backprop_and_am_adam_and_denoises_test_images():
    patches = random_patches(load_training_images(("brick", "gravel", "grass")), 384, 24, seed=0)
    tests = [load_test_image(name, 48) for name in ("camera", "coins")]
    for name in ("backprop", "am-adam"):
        torch.manual_seed(0)
        learner = amstream.LEARNERS[name](dncnn(16, 4), criterion=nn.MSELoss())
        denoiser, losses = train_denoiser(learner, patches, (0.05, 0.15), epochs=3, batch_size=32, seed=1)
        assert np.mean(losses[-6:]) < 0.8 * np.mean(losses[:3]), (name, losses[:3], losses[-6:])
        noisy_db, denoised_db = denoising_psnr(denoiser, tests, 0.1)
        assert denoised_db > noisy_db + 1.5, (name, noisy_db, denoised_db)


def test_which_learners_train_the_network_and_which_say_why_not():
    """Every registered learner either steps the DnCNN (finite losses, changed weights) or refuses it."""
    patches = random_patches(load_training_images(("brick",)), 16, 12, seed=0)
    generator = torch.Generator().manual_seed(0)
    trains, refuses = set(), {}
    for name, cls in amstream.LEARNERS.items():
        torch.manual_seed(0)
        try:
            learner = cls(dncnn(4, 3), criterion=nn.MSELoss())
        except amstream.UnsupportedModelError as err:
            refuses[name] = str(err)
            continue
        before = [p.detach().clone() for p in learner.model.parameters()]
        for start in (0, 8):
            clean = patches[start:start + 8]
            sigma = torch.full((8,), 0.1)
            noise = 0.1 * torch.randn(clean.shape, generator=generator)
            info = learner.learn(torch.cat([clean + noise, sigma.reshape(-1, 1, 1, 1).expand_as(clean)], 1), noise)
            assert torch.isfinite(info.loss) and not info.rolled_back, name
        assert any(not torch.equal(a, b) for a, b in zip(before, learner.model.parameters())), name
        trains.add(name)
    assert trains == {"backprop", "am-adam", "locoprop-s", "locoprop-m", "sbe", "sbpca", "frank-wolfe"}
    assert set(refuses) == {"am-mem", "dladmm", "admm-softmax", "admm-rnn", "am-rnn"}
    assert "Conv" in refuses["am-mem"] and "Conv2d" in refuses["dladmm"]


def test_denoiser_files_round_trip_and_refuse_other_files(tmp_path):
    denoiser = NetworkDenoiser(dncnn(8, 3), (0.01, 0.2), "DnCNN (test)")
    save_denoiser(tmp_path / "d.pt", denoiser, trained_by="backprop")
    loaded, extra = load_denoiser(tmp_path / "d.pt")
    assert extra == {"trained_by": "backprop"} and loaded.noise_range == (0.01, 0.2)
    image = load_test_image("moon", 16)
    torch.testing.assert_close(loaded(image, 0.1), denoiser(image, 0.1))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an amstream denoiser"):
        load_denoiser(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_denoiser(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------- images
def test_images_are_real_grayscale_and_test_images_never_train():
    for name in ("camera", "moon", "coins", "phantom"):
        image = load_test_image(name, 64)
        assert image.shape == (64, 64) and 0 <= float(image.min()) and float(image.max()) <= 1
        assert float(image.std()) > 0.03
    with pytest.raises(ValueError, match="test images"):
        load_training_images(("grass", "camera"))
    with pytest.raises(ValueError, match="unknown test image"):
        load_test_image("grass")


@pytest.mark.data
def test_digits_are_the_small_image_case():
    digit = load_test_image("mnist:3", None)
    assert digit.shape == (28, 28) and float(digit.max()) == pytest.approx(1.0, abs=0.01)
    assert len(load_training_images("fashion-mnist")) == 60000


def test_missing_scikit_image_gives_a_clear_error(monkeypatch):
    for module in [m for m in sys.modules if m == "skimage" or m.startswith("skimage.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(MissingExtraError, match=r"amstream\[reconstruction\]"):
        load_test_image("camera")


# ----------------------------------------------------------------------------------------- the script
def _script(*args: str, check: bool = True):
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "scripts" / "reconstruct.py"), "--quiet", *args], cwd=root,
                          env={**os.environ, "MPLBACKEND": "Agg"}, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_script_reconstructs_writes_images_and_resumes_exactly(tmp_path):
    import json

    common = ["--size", "32", "--operator", "ct", "--angles", "18", "--blocks", "6", "--denoiser", "tv",
              "--denoiser", "train:am-adam", "--patches", "96", "--patch-size", "24", "--epochs", "1",
              "--checkpoint-every", "2"]
    _script(*common, "--iterations", "6", "--out", str(tmp_path / "whole"))
    _script(*common, "--iterations", "3", "--out", str(tmp_path / "cut"))
    proc = _script(*common, "--iterations", "6", "--resume", str(tmp_path / "cut"))
    assert "resumed at iteration 3" in proc.stdout and "trained" not in proc.stdout  # the saved network is reused
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    resumed = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert [r["psnr"] for r in resumed["rows"]] == [r["psnr"] for r in whole["rows"]]
    history = torch.load(tmp_path / "cut" / "full-tv.pt", weights_only=True)["extra"]["history"]
    assert [h[0] for h in history] == [1, 2, 3, 4, 5, 6]  # the curve before the cut survives the resume
    assert all(r["psnr"] > whole["back_projection_psnr"] + 3 for r in whole["rows"]), whole
    assert len(whole["rows"]) == 4 and whole["rows"][1]["iterations"] == 36  # incremental: 6 passes of 6 blocks
    names = {p.name for p in (tmp_path / "whole").iterdir()}
    assert {"ground-truth.png", "back-projection.png", "full-tv.png", "incremental-dncnn-am-adam.png", "psnr.png",
            "tensorboard"} <= names
    assert "PSNR dB" in proc.stdout and "back-projection" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--operator", "blur", "--blocks", "40", "--size", "32"], "at most the image height"),
    (["--sigma", "80", "--denoiser", "train:backprop"], r"trained for noise levels sigma in \[0.00392157"),
    (["--denoiser", "train:nope"], "unknown learner 'nope'"),
    (["--denoiser", "vgg"], "unknown denoiser 'vgg'"),
    (["--image", "grass"], "unknown test image 'grass'"),
    (["--noise-range", "5"], "--noise-range must be LOW,HIGH"),
])
def test_script_refuses_bad_settings_before_writing(tmp_path, args, message):
    proc = _script(*args, "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists()


def test_script_never_overwrites_a_run(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    proc = _script("--size", "16", "--denoiser", "tv", "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "nothing was overwritten" in proc.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


@pytest.mark.gpu
@pytest.mark.parametrize("make", [lambda d: GaussianSensing((24, 24), 0.4, 6, dtype=F64, device=d),
                                  lambda d: ParallelBeamCT((24, 24), 12, 4, dtype=F64, device=d)], ids=["cs", "ct"])
def test_reconstruction_on_cuda_equals_the_cpu(make):
    image = load_test_image("coins", 24).double()
    results = []
    for device in ("cpu", "cuda"):
        op = make(device)
        torch.manual_seed(0)
        denoiser = NetworkDenoiser(dncnn(8, 3).double().to(device), (0.01, 0.2))
        pnp = PnPADMM(op, denoiser, _measure(op, image.to(device)), gamma=1.0, sigma=0.05, seed=1,
                      reference=image.to(device))
        pnp.run(12)
        assert pnp.x.device.type == device
        results.append(pnp.x.cpu())
    torch.testing.assert_close(results[1], results[0], rtol=1e-9, atol=1e-9)
