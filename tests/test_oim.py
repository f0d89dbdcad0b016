"""Tests of qeeps_d2.modeling.oim.OIMLoss: loss/gradient math, LUT and queue updates, DDP sync."""
import math
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import oim_dist_worker
from qeeps_d2.modeling.oim import OIMLoss, _occurrence_rank

E = torch.eye(4)


def unit(*components: float) -> torch.Tensor:
    return F.normalize(torch.tensor(components, dtype=torch.float32), dim=0)


def reference_update(oim: OIMLoss, embeddings: torch.Tensor, pids: torch.Tensor) -> None:
    """Row-by-row update as in the reference implementations (one Python step per row)."""
    m = oim.momentum
    for x, y in zip(embeddings, pids.tolist()):
        if y >= 0:
            oim.lut[y] = F.normalize(m * oim.lut[y] + (1 - m) * x, dim=0)
        else:
            oim.queue[oim.queue_ptr] = x
            oim.queue_ptr.copy_((oim.queue_ptr + 1) % oim.queue_size)


def tiny_oim(scalar: float = 1.0) -> OIMLoss:
    """D=4, 3 pids, queue 2: lut = [e0, e1, e2], queue = [e3, 0], ptr 1."""
    oim = OIMLoss(num_pids=3, queue_size=2, emb_dim=4, scalar=scalar)
    oim.lut.copy_(E[:3])
    oim.queue[0] = E[3]
    oim.queue_ptr.fill_(1)
    return oim


def test_loss_value_matches_hand_computation():
    oim = tiny_oim(scalar=1.0).eval()
    x = torch.stack([E[0], unit(0, 1, 0, 1)])
    loss = oim(x, torch.tensor([0, 2]))
    # Row 0: logits [1, 0, 0, 0, 0], target 0 -> log(e + 4) - 1.
    # Row 1: logits [0, c, 0, c, 0] with c = 1/sqrt(2), target 2 -> log(3 + 2 e^c).
    c = 1 / math.sqrt(2)
    expected = 0.5 * ((math.log(math.e + 4) - 1) + math.log(3 + 2 * math.exp(c)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_default_scalar_is_30():
    oim = tiny_oim(scalar=30.0).eval()
    loss = oim(E[1:2], torch.tensor([1]))
    assert loss.item() == pytest.approx(math.log(1 + 4 * math.exp(-30.0)), abs=1e-12)
    assert OIMLoss(3, 2, 4).scalar == 30.0


def test_gradient_uses_the_table_before_the_update():
    torch.manual_seed(0)
    oim = tiny_oim(scalar=30.0).train()
    old_table = torch.cat([oim.lut, oim.queue]).clone()
    x = F.normalize(torch.randn(4, 4), dim=1).requires_grad_()
    pids = torch.tensor([1, -1, 2, 1])
    loss = oim(x, pids)
    assert not torch.equal(torch.cat([oim.lut, oim.queue]), old_table)  # the update happened
    loss.backward()

    labeled = pids >= 0
    probs = torch.softmax(30.0 * x.detach()[labeled] @ old_table.t(), dim=1)
    onehot = F.one_hot(pids[labeled], num_classes=5).float()
    expected = torch.zeros(4, 4)
    expected[labeled] = 30.0 * (probs - onehot) @ old_table / labeled.sum()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-6)


def test_lut_update_is_momentum_mix_then_renormalised():
    oim = tiny_oim().train()
    oim(E[3:4], torch.tensor([1]))
    torch.testing.assert_close(oim.lut[1], unit(0, 1, 0, 1))
    torch.testing.assert_close(oim.lut[[0, 2]], E[[0, 2]])  # other rows untouched
    assert oim.queue_ptr.item() == 1  # no unlabeled row


def test_pid_seen_twice_in_a_batch_is_updated_twice_in_order():
    oim = tiny_oim().train()
    # lut[0] = e0 -> normalize(e0 + e1) -> normalize((e0 + e1)/sqrt(2) + e2) = (.5, .5, c, 0)
    oim(torch.stack([E[1], E[3], E[2]]), torch.tensor([0, 2, 0]))
    c = 1 / math.sqrt(2)
    torch.testing.assert_close(oim.lut[0], torch.tensor([0.5, 0.5, c, 0.0]))
    torch.testing.assert_close(oim.lut[2], unit(0, 0, 1, 1))


def test_lut_update_matches_row_by_row_reference():
    torch.manual_seed(1)
    oim = OIMLoss(num_pids=4, queue_size=3, emb_dim=8).train()
    ref = OIMLoss(num_pids=4, queue_size=3, emb_dim=8)
    for _ in range(3):
        x = F.normalize(torch.randn(12, 8), dim=1)
        pids = torch.randint(-1, 4, (12,))
        oim(x, pids)
        reference_update(ref, x, pids)
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(getattr(oim, name), buf)


def test_occurrence_rank_counts_earlier_rows_with_the_same_pid():
    assert _occurrence_rank(torch.tensor([4, 7, 4, 4, 7])).tolist() == [0, 0, 1, 2, 1]


def test_queue_wraps_around_and_advances_ptr():
    oim = tiny_oim().train()  # ptr 1
    u = [unit(1, k, 0, 0) for k in range(1, 6)]
    oim(torch.stack(u[:3]), torch.full((3,), -1))  # slots 1, 0, 1
    torch.testing.assert_close(oim.queue, torch.stack([u[1], u[2]]))
    assert oim.queue_ptr.item() == 0
    oim(u[3][None], torch.tensor([-1]))  # slot 0
    torch.testing.assert_close(oim.queue, torch.stack([u[3], u[2]]))
    assert oim.queue_ptr.item() == 1
    torch.testing.assert_close(oim.lut, E[:3])  # unlabeled rows never touch the LUT


def test_more_unlabeled_rows_than_queue_slots_keeps_the_last_ones():
    oim = tiny_oim().train()  # ptr 1
    u = torch.stack([unit(1, k, 0, 0) for k in range(1, 6)])
    oim(u, torch.full((5,), -1))  # slots 1, 0, 1, 0, 1
    torch.testing.assert_close(oim.queue, torch.stack([u[3], u[4]]))
    assert oim.queue_ptr.item() == 0


def test_unlabeled_rows_do_not_enter_the_cross_entropy():
    torch.manual_seed(2)
    x = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    loss_all = tiny_oim(scalar=30.0).eval()(x, torch.tensor([2, -1, 0]))
    loss_all.backward()
    loss_labeled = tiny_oim(scalar=30.0).eval()(x.detach()[[0, 2]], torch.tensor([2, 0]))
    assert loss_all.item() == pytest.approx(loss_labeled.item(), rel=1e-6)
    assert torch.all(x.grad[1] == 0)
    assert torch.any(x.grad[0] != 0)


def test_no_labeled_row_gives_zero_loss_attached_to_the_graph():
    oim = tiny_oim().train()
    x = torch.stack([unit(1, 1, 0, 0), unit(0, 1, 1, 0)]).requires_grad_()
    loss = oim(x, torch.tensor([-1, -1]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(x.grad, torch.zeros(2, 4))
    torch.testing.assert_close(oim.queue, torch.stack([unit(0, 1, 1, 0), unit(1, 1, 0, 0)]))


def test_empty_batch_gives_zero_loss_and_no_update():
    oim = tiny_oim().train()
    loss = oim(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.int64))
    assert loss.item() == 0.0 and loss.requires_grad
    assert oim.queue_ptr.item() == 1


def test_eval_mode_does_not_update():
    oim = tiny_oim().eval()
    before = {name: buf.clone() for name, buf in oim.named_buffers()}
    oim(torch.stack([E[3], E[1]]), torch.tensor([0, -1]))
    for name, buf in oim.named_buffers():
        assert torch.equal(buf, before[name]), name


@pytest.mark.parametrize("bad_pid", [3, 17, -2])
def test_out_of_range_pid_raises_naming_the_value(bad_pid):
    oim = tiny_oim()
    with pytest.raises(ValueError, match=f"pid {bad_pid} is out of range"):
        oim(torch.stack([E[0], E[1]]), torch.tensor([0, bad_pid]))


def test_bad_shapes_raise():
    oim = tiny_oim()
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        oim(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pids must have shape"):
        oim(torch.zeros(2, 4), torch.tensor([0]))
    with pytest.raises(ValueError, match="pids must be int64"):
        oim(torch.zeros(2, 4), torch.tensor([0, 1], dtype=torch.int32))


def test_state_dict_round_trip_carries_lut_queue_and_ptr():
    torch.manual_seed(3)
    oim = OIMLoss(num_pids=3, queue_size=2, emb_dim=4).train()
    oim(F.normalize(torch.randn(5, 4), dim=1), torch.tensor([0, -1, 2, -1, -1]))
    state = oim.state_dict()
    assert set(state) == {"lut", "queue", "queue_ptr"}
    restored = OIMLoss(num_pids=3, queue_size=2, emb_dim=4)
    restored.load_state_dict(state)
    assert restored.queue_ptr.item() == 1
    for name, buf in oim.named_buffers():
        assert torch.equal(getattr(restored, name), buf), name


def _run_single_process_reference():
    """Feed the ranks' batches concatenated in rank order to one module.

    Returns its final buffers and, per step and rank, the loss of that rank's rows against the
    tables before the step: (steps, world_size).
    """
    oim = oim_dist_worker.make_oim_loss()
    per_rank = [oim_dist_worker.rank_batches(r) for r in range(oim_dist_worker.WORLD_SIZE)]
    losses = []
    for step_batches in zip(*per_rank):
        oim.eval()
        losses.append(torch.stack([oim(x, p) for x, p in step_batches]))
        oim.train()
        oim(torch.cat([x for x, _ in step_batches]), torch.cat([p for _, p in step_batches]))
    return dict(oim.named_buffers()), torch.stack(losses)


def test_two_gloo_processes_keep_identical_tables(tmp_path):
    ctx = mp.start_processes(
        oim_dist_worker.run_rank,
        args=(str(tmp_path / "pg_init"), str(tmp_path)),
        nprocs=oim_dist_worker.WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("the two gloo ranks did not finish within 90 s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(oim_dist_worker.WORLD_SIZE)]
    expected_buffers, expected_losses = _run_single_process_reference()
    for name, expected in expected_buffers.items():
        assert torch.equal(results[0][name], results[1][name]), name
        assert torch.equal(results[0][name], expected), name
    num_unlabeled = sum(
        int((pids == -1).sum())
        for r in range(oim_dist_worker.WORLD_SIZE)
        for _, pids in oim_dist_worker.rank_batches(r)
    )
    assert results[0]["queue_ptr"].item() == num_unlabeled % oim_dist_worker.QUEUE_SIZE
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["losses"], expected_losses[:, rank])
