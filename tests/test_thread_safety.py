"""Queries stay exact while another thread changes the fitted state."""

from __future__ import annotations

import threading

import torch

from models import loader, make_case
from pydvl_datainf import DataInfInfluence
from reference import DenseDataInf, rel_err


class _Hook:
    """A loss that runs `action` once, in the middle of a gradient computation."""

    def __init__(self, loss):
        self.loss = loss
        self.action = None

    def __call__(self, prediction, target):
        action, self.action = self.action, None
        if action is not None:
            action()
        return self.loss(prediction, target)


def test_a_state_change_during_a_query_leaves_no_stale_factors():
    model, loss, x, y, xt, yt = make_case("mlp")
    hook = _Hook(loss)
    infl = DataInfInfluence(model, hook, progress=False).fit(loader(x, y))
    blocks = infl.blocks.to_dict()
    lam1 = dict(infl.block_regularization)
    lam2 = {k: 7 * v for k, v in lam1.items()}
    a1 = DenseDataInf(model, loss, x, y, blocks, lam1).influences(xt, yt, x, y)
    a2 = DenseDataInf(model, loss, x, y, blocks, lam2).influences(xt, yt, x, y)
    # λ changes while the query computes its test gradients: the query keeps
    # the state it started with, and its factors are not cached for the new one
    hook.action = lambda: infl.with_regularization(lam2)
    first = infl.influences(xt, yt, x, y)
    assert rel_err(first, a1) < 1e-8
    assert infl.block_regularization == lam2
    second = infl.influences(xt, yt, x, y)
    assert rel_err(second, a2) < 1e-8
    # the same with a move to another device (here: the same device), on test
    # points not in the factor cache (the change fires while computing them)
    hook.action = lambda: infl.to("cpu").with_regularization(lam1)
    assert rel_err(infl.influences(xt[:3], yt[:3], x, y), a2[:3]) < 1e-8
    assert hook.action is None
    assert rel_err(infl.influences(xt[:3], yt[:3], x, y), a1[:3]) < 1e-8


def test_stress_queries_while_another_thread_changes_lambda():
    torch.set_num_threads(1)
    model, loss, x, y, xt, yt = make_case("conv")
    infl = DataInfInfluence(model, loss, progress=False).fit(loader(x, y))
    blocks = infl.blocks.to_dict()
    specs = [
        dict(infl.block_regularization),
        {k: 3 * v for k, v in infl.block_regularization.items()},
        {k: 0.2 * v for k, v in infl.block_regularization.items()},
    ]
    answers = [
        DenseDataInf(model, loss, x, y, blocks, lam).influences(xt, yt, x, y)
        for lam in specs
    ]
    errors = []
    stop = threading.Event()

    def query(i):
        try:
            rows = slice(i % len(xt), i % len(xt) + 2)
            for j in range(12):
                if j % 3 == 2:
                    got = infl.train_influences(xt[rows], yt[rows])
                else:
                    got = infl.influences(xt[rows], yt[rows], x, y)
                if min(rel_err(got, a[rows]) for a in answers) > 1e-8:
                    errors.append(f"thread {i}, query {j}: not a valid answer")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    def change():
        k = 0
        while not stop.is_set():
            k += 1
            infl.with_regularization(specs[k % len(specs)])
            if k % 5 == 0:
                infl.to("cpu")

    changer = threading.Thread(target=change)
    workers = [threading.Thread(target=query, args=(i,)) for i in range(4)]
    changer.start()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    stop.set()
    changer.join()
    assert not errors, errors[:5]
    assert infl.generation > 3
