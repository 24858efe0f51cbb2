#!/usr/bin/env python
"""ADMM-Softmax's experiment: multinomial logistic regression on MNIST, validation accuracy against time.

The setting of Wu Fung, Tyrvainen, Ruthotto, Haber (ETNA 2020) and its MNIST driver: the first 50,000
training images to train, the last 10,000 to validate, one objective for every method,
``sum_i CE(W d_i, y_i) + alpha/2 ||W||^2`` (features ``d`` with a 1 for the bias), and a wall-time
budget per method (the driver's: 500 s). Methods, side by side on the same features and the same
initial weights (zero):

- ``admm``: ADMM-Softmax's full-batch iteration (``ADMMSoftmax.fit``; ``--rho`` its initial rho);
- ``lbfgs``: ``torch.optim.LBFGS`` (strong-Wolfe line search) on the full objective;
- ``newton-cg``: Newton's method with the Hessian solved by 20 conjugate-gradient steps
  (Hessian-vector products through autograd) and an Armijo line search, on the full objective;
- ``adam``, ``sgd``: mini-batches of ``--batch-size`` on the same objective (per-batch mean).

Features: ``pixels`` (784 raw pixels in [0, 1]); ``random-conv`` (the reference's "extreme learning"
features: a fixed random 3x3 convolution with 9 channels and tanh, 7,056 features).

    python scripts/softmax_regression.py --seconds 60
    python scripts/softmax_regression.py --features random-conv --seconds 300 --method admm --method lbfgs
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from _common import Parser  # noqa: E402
from amstream import ADMMSoftmax, set_seed  # noqa: E402
from amstream.data import load_mnist  # noqa: E402

METHODS = ("admm", "lbfgs", "newton-cg", "adam", "sgd")


def features(kind: str, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``(N, n)`` features of ``(N, 1, 28, 28)`` images in [0, 1]."""
    if kind == "pixels":
        return images.flatten(1)
    g = torch.Generator().manual_seed(seed)
    kernel = torch.randn(9, 1, 3, 3, generator=g, dtype=images.dtype)
    with torch.no_grad():
        return torch.tanh(F.conv2d(images, kernel, padding=1)).flatten(1)  # 9 x 28 x 28 = 7,056 features


def objective(W: torch.Tensor, D: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return F.cross_entropy(D @ W.T, y, reduction="sum") + 0.5 * alpha * W.square().sum()


def accuracy(W: torch.Tensor, D: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((D @ W.T).argmax(1) == y).float().mean())


class Recorder:
    """(seconds, validation accuracy, objective) points; the evaluation time is not counted."""

    def __init__(self, D, y, Dv, yv, alpha):
        self.D, self.y, self.Dv, self.yv, self.alpha = D, y, Dv, yv, alpha
        self.points, self.paused, self.start = [], 0.0, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def record(self, W: torch.Tensor) -> None:
        t, t0 = self.elapsed(), time.perf_counter()
        with torch.no_grad():
            self.points.append((t, accuracy(W, self.Dv, self.yv), float(objective(W, self.D, self.y, self.alpha))))
        self.paused += time.perf_counter() - t0


def run_admm(D, y, rec, seconds, alpha, rho):
    learner = ADMMSoftmax(nn.Linear(D.shape[1] - 1, 10).to(D.dtype), alpha=alpha, rho=rho, device="cpu",
                          input_shape=(D.shape[1] - 1,))
    with torch.no_grad():
        learner.model.weight.zero_()
        learner.model.bias.zero_()
    rec.start = time.perf_counter()  # the factorization is part of the method's time

    def weights():
        return torch.cat([learner.model.weight, learner.model.bias[:, None]], 1).detach()

    learner.fit(D[:, :-1], y, iterations=10**9, seconds=seconds, callback=lambda it, r: rec.record(weights()))


def run_lbfgs(D, y, rec, seconds, alpha):
    W = torch.zeros(10, D.shape[1], dtype=D.dtype, requires_grad=True)
    # max_iter=1 per call would stall (torch's LBFGS keeps its step state between calls and stops
    # improving, measured): 10 iterations per call, a point of the curve after each call
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = objective(W, D, y, alpha)
        value.backward()
        return value

    while rec.elapsed() < seconds:
        opt.step(closure)
        rec.record(W.detach())


def run_newton_cg(D, y, rec, seconds, alpha, cg_steps=20):
    W = torch.zeros(10, D.shape[1], dtype=D.dtype)
    while rec.elapsed() < seconds:
        Wv = W.clone().requires_grad_(True)
        f = objective(Wv, D, y, alpha)
        (g,) = torch.autograd.grad(f, Wv, create_graph=True)
        # truncated conjugate gradients on H s = -g (H positive definite: alpha > 0)
        s, r = torch.zeros_like(W), -g.detach()
        p, rr = r.clone(), (r * r).sum()
        for _ in range(cg_steps):
            (Hp,) = torch.autograd.grad(g, Wv, p, retain_graph=True)
            step = rr / (p * Hp).sum()
            s, r = s + step * p, r - step * Hp
            rr_new = (r * r).sum()
            if rr_new.sqrt() < 1e-4 * g.detach().norm():
                break
            p, rr = r + (rr_new / rr) * p, rr_new
        t, f0, slope = 1.0, float(f.detach()), float((g.detach() * s).sum())
        while t > 1e-8 and float(objective(W + t * s, D, y, alpha)) > f0 + 1e-4 * t * slope:
            t *= 0.5
        W = W + t * s
        rec.record(W)


def run_minibatch(D, y, rec, seconds, alpha, method, lr, batch_size, seed):
    W = torch.zeros(10, D.shape[1], dtype=D.dtype, requires_grad=True)
    opt = torch.optim.Adam([W], lr=lr) if method == "adam" else torch.optim.SGD([W], lr=lr)
    g = torch.Generator().manual_seed(seed)
    n = D.shape[0]
    while rec.elapsed() < seconds:
        order = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            # the full objective's per-sample share: mean CE + alpha/(2N) ||W||^2
            loss = F.cross_entropy(D[idx] @ W.T, y[idx]) + 0.5 * alpha / n * W.square().sum()
            loss.backward()
            opt.step()
        rec.record(W.detach())


def reference_z_step(V, Y, rho, Z, newton_iterations=100, cg_iterations=20, tol=1e-4):
    """The reference's Z-step semantics: one Newton-CG on the joint objective over all samples (Meganet's
    ``newton`` with Steihaug-CG: 100 Newton and 20 CG iterations at most, tolerances 1e-4, Armijo)."""
    def value(Z):
        return float((torch.logsumexp(Z, 1) - (Z * Y).sum(1)).sum() + 0.5 * rho * (Z - V).square().sum())

    g0 = None
    for _ in range(newton_iterations):
        P = torch.softmax(Z, 1)
        G = P - Y + rho * (Z - V)
        g_norm = float(G.norm())
        g0 = g0 or g_norm
        if g_norm <= tol * (1 + g0):
            break

        def hess(v):
            return rho * v + P * v - P * (P * v).sum(1, keepdim=True)

        S, R = torch.zeros_like(Z), -G
        Pd, rr = R.clone(), float((R * R).sum())
        for _ in range(cg_iterations):
            Hp = hess(Pd)
            step = rr / float((Pd * Hp).sum())
            S, R = S + step * Pd, R - step * Hp
            rr_new = float((R * R).sum())
            if rr_new ** 0.5 <= tol * g_norm:
                break
            Pd, rr = R + (rr_new / rr) * Pd, rr_new
        t, f0, slope = 1.0, value(Z), float((G * S).sum())
        for _ in range(20):
            if value(Z + t * S) <= f0 + 1e-4 * t * slope:
                break
            t *= 0.5
        Z = Z + t * S
    return Z


def iteration_costs(D, y, alpha, rho, rounds=5):
    """Seconds per ADMM-Softmax iteration with the reference's semantics (the W-step system re-solved
    every iteration, the joint Newton-CG Z-step) and with this toolkit's (the eigendecomposition
    reused for every rho, the per-sample Sherman-Morrison Newton), side by side from the same state."""
    from amstream.learners.admm_softmax import NormalEquations, softmax_prox_newton
    Y = F.one_hot(y, 10).to(D.dtype)
    G = D.T @ D
    t0 = time.perf_counter()
    cached = NormalEquations(G, alpha, eigen=True)
    setup = time.perf_counter() - t0
    W = torch.zeros(10, D.shape[1], dtype=D.dtype)
    Z, U = D @ W.T, torch.zeros(D.shape[0], 10, dtype=D.dtype)
    times = {"reference": [], "ours": []}
    for _ in range(rounds):
        for kind in ("reference", "ours"):
            start = time.perf_counter()
            R = rho * (D.T @ (Z + U))
            if kind == "reference":
                A = rho * G + alpha * torch.eye(len(G), dtype=G.dtype)
                Wn = torch.linalg.solve(A, R).T
                Zn = reference_z_step(D @ Wn.T - U, Y, rho, Z)
            else:
                Wn = cached.solve(rho, R).T
                Zn = softmax_prox_newton(D @ Wn.T - U, Y, rho, Z, iterations=50, tol=1e-5)[0]
            Un = U + Zn - D @ Wn.T
            times[kind].append(time.perf_counter() - start)
        W, Z, U = Wn, Zn, Un  # both continue from the same (our) iterate
    return setup, times


def main(argv=None) -> None:
    p = Parser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--data-dir", default=None, help="root of the MNIST files (default: AMSTREAM_DATA)")
    p.add_argument("--features", choices=("pixels", "random-conv"), default="pixels", help="the features")
    p.add_argument("--method", action="append", choices=METHODS, help=f"methods to run (default: all: {', '.join(METHODS)})")
    p.add_argument("--seconds", type=float, default=60.0, help="wall-time budget per method")
    p.add_argument("--alpha", type=float, default=0.1, help="regularizer weight (the reference's 0.1)")
    p.add_argument("--rho", type=float, default=1e-8, help="ADMM's initial rho (the reference's 1e-8)")
    p.add_argument("--lr", type=float, default=None, help="adam/sgd learning rate (default: adam 1e-3, sgd 0.1)")
    p.add_argument("--batch-size", type=int, default=100, help="adam/sgd mini-batch")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                   help="the reference runs in double precision")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the curves here")
    p.add_argument("--plot", default=None, help="PNG of validation accuracy against time (default: next to --json)")
    p.add_argument("--rounds", type=int, default=5, help="--iteration-cost: iterations timed per semantics")
    p.add_argument("--iteration-cost", action="store_true",
                   help="instead: seconds per ADMM iteration with the reference's semantics and with ours, side by side")
    args = p.parse_args(argv)
    if args.seconds <= 0 or args.alpha <= 0 or args.rho <= 0:
        p.error("--seconds, --alpha and --rho must be > 0 (alpha > 0 keeps the problem strictly convex)")
    torch.set_num_threads(args.threads)
    set_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    try:
        train = load_mnist("train", args.data_dir, normalize=False)
    except (ValueError, FileNotFoundError) as err:
        p.error(str(err))
    X = features(args.features, train.x.to(dtype), args.seed)
    D_all = torch.cat([X, torch.ones(len(X), 1, dtype=dtype)], 1)
    D, y, Dv, yv = D_all[:50_000], train.y[:50_000], D_all[50_000:], train.y[50_000:]
    print(f"MNIST, {args.features}: {D.shape[1] - 1} features + bias, 50,000 train, 10,000 validation, "
          f"alpha {args.alpha}, {args.seconds:g} s per method, {args.dtype}, {args.threads} thread(s)")
    if args.iteration_cost:
        setup, times = iteration_costs(D, y, args.alpha, 1.0, rounds=args.rounds)
        ref, ours = sorted(times["reference"]), sorted(times["ours"])
        ratios = sorted(r / o for r, o in zip(times["reference"], times["ours"]))
        print(f"seconds per iteration (median of {len(ref)}, rho 1): reference semantics {ref[len(ref) // 2]:.3f}, "
              f"ours {ours[len(ours) // 2]:.3f} (ratio {ratios[len(ratios) // 2]:.1f}x, range {ratios[0]:.1f}-"
              f"{ratios[-1]:.1f}x); our one-time eigendecomposition {setup:.2f} s")
        return
    results = {}
    for method in args.method or METHODS:
        rec = Recorder(D, y, Dv, yv, args.alpha)
        if method == "admm":
            run_admm(D, y, rec, args.seconds, args.alpha, args.rho)
        elif method == "lbfgs":
            run_lbfgs(D, y, rec, args.seconds, args.alpha)
        elif method == "newton-cg":
            run_newton_cg(D, y, rec, args.seconds, args.alpha)
        else:
            lr = args.lr or (1e-3 if method == "adam" else 0.1)
            run_minibatch(D, y, rec, args.seconds, args.alpha, method, lr, args.batch_size, args.seed)
        points = rec.points
        best = max(points, key=lambda q: q[1]) if points else (0, 0, 0)
        results[method] = {"curve": points, "best_validation": best[1], "best_at_seconds": best[0]}
        marks = {}
        for budget in (1, 5, 10, 30, 60, 120, 300, 500):
            before = [q for q in points if q[0] <= budget]
            if before and budget <= args.seconds:
                marks[budget] = max(q[1] for q in before)
        line = ", ".join(f"{b} s: {a:.4f}" for b, a in marks.items()) or f"{best[0]:.1f} s: {best[1]:.4f}"
        print(f"{method:10s} {len(points):6d} curve points; best validation accuracy by {line}; "
              f"final objective {points[-1][2]:.1f}" if points else f"{method}: no iteration in the budget")
    if args.json:
        Path(args.json).write_text(json.dumps({"options": vars(args), "results": results}, indent=1))
        print(f"Results: {args.json}")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot:
        import _plots
        _plots.plot_against_time({m: [(t, a) for t, a, _ in r["curve"]] for m, r in results.items()}, plot,
                                 ylabel="validation accuracy", title=f"MNIST softmax regression, {args.features}")
        print(f"Plot: {plot}")


if __name__ == "__main__":
    main()
