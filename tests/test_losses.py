"""Stage losses: per-token forward KL (SPEC 7) and its chunked twin, sigmoid DPO (SPEC 8), ILD MSE (SPEC 4)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from zebra.stages import losses
from zebra.stages.losses import (
    chunked_kl_from_hidden,
    dpo_loss,
    forward_kl_per_token,
    ild_loss,
    sequence_logprob,
)

log = math.log


# ---- forward KL ----------------------------------------------------------------------------------------------
def test_kl_hand_computed():
    """2 tokens, 3-word vocab, probabilities chosen so every term can be written out with math.log."""
    teacher = torch.tensor([[[0.0, 0.0, 0.0], [log(2), 0.0, 0.0]]])  # p_t = [1/3]*3, [1/2, 1/4, 1/4]
    student = torch.tensor([[[0.0, log(2), 0.0], [0.0, 0.0, 0.0]]])  # p_s = [1/4, 1/2, 1/4], [1/3]*3
    kl1 = 1 / 3 * (log(1 / 3) - log(1 / 4)) + 1 / 3 * (log(1 / 3) - log(1 / 2)) + 1 / 3 * (log(1 / 3) - log(1 / 4))
    kl2 = 1 / 2 * (log(1 / 2) - log(1 / 3)) + 2 * (1 / 4 * (log(1 / 4) - log(1 / 3)))
    loss, n = forward_kl_per_token(teacher, student)
    assert n == 2
    assert loss.item() == pytest.approx((kl1 + kl2) / 2, rel=1e-6)
    # direction matters: on token 1 alone, KL(p_s || p_t) is a different number, so this is the forward KL
    assert forward_kl_per_token(teacher[:, :1], student[:, :1])[0].item() == pytest.approx(kl1, rel=1e-6)
    assert forward_kl_per_token(student[:, :1], teacher[:, :1])[0].item() != pytest.approx(kl1, rel=1e-3)


def test_kl_zero_for_identical_logits():
    """KL(p || p) = 0, also for logits shifted by a per-token constant (same distribution)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7)
    assert forward_kl_per_token(x, x)[0].item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl_per_token(x, x + torch.randn(2, 5, 1))[0].item() == pytest.approx(0.0, abs=1e-6)
    assert forward_kl_per_token(x, torch.randn(2, 5, 7))[0].item() > 0.01


def test_kl_mask_excludes_tokens():
    """Masked-out tokens do not count, even when their logits are nan (padding garbage)."""
    torch.manual_seed(0)
    t, s = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    s_bad = s.clone()
    s_bad[0, 1] = float("nan")
    loss, n = forward_kl_per_token(t, s_bad, torch.tensor([[1, 0, 1]]))
    assert n == 2
    expected = (forward_kl_per_token(t[:, :1], s[:, :1])[0] + forward_kl_per_token(t[:, 2:], s[:, 2:])[0]) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_kl_per_token_normalisation():
    """Repeating the same tokens (longer sequence or bigger batch) leaves the loss unchanged, doubles n."""
    torch.manual_seed(0)
    t, s = torch.randn(1, 4, 6), torch.randn(1, 4, 6)
    mask = torch.tensor([[1, 1, 0, 1]])
    base, n = forward_kl_per_token(t, s, mask)
    longer, n2 = forward_kl_per_token(torch.cat([t, t], 1), torch.cat([s, s], 1), torch.cat([mask, mask], 1))
    wider, n3 = forward_kl_per_token(torch.cat([t, t], 0), torch.cat([s, s], 0), torch.cat([mask, mask], 0))
    assert (n, n2, n3) == (3, 6, 6)
    assert longer.item() == pytest.approx(base.item(), rel=1e-6)
    assert wider.item() == pytest.approx(base.item(), rel=1e-6)


def test_kl_empty_mask_is_differentiable_zero():
    """No counted token: loss 0, n 0, and backward still works."""
    s = torch.randn(1, 2, 3, requires_grad=True)
    loss, n = forward_kl_per_token(torch.randn(1, 2, 3), s, torch.zeros(1, 2))
    loss.backward()
    assert n == 0 and loss.item() == 0.0 and torch.all(s.grad == 0)


# ---- chunked KL ------------------------------------------------------------------------------------------------
def _kl_setup(seed=0, B=2, T=5, d=8, d_t=6, V=11):
    torch.manual_seed(seed)
    s_h = torch.randn(B, T, d, requires_grad=True)
    head = nn.Linear(d, V, bias=True)
    t_h = torch.randn(B, T, d_t, requires_grad=True)  # requires_grad only to prove no gradient reaches it
    t_head = torch.randn(V, d_t, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0]])
    return s_h, head, t_h, t_head, mask


@pytest.mark.parametrize("chunk", [1, 3, 100])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_kl_equals_full(chunk, temperature):
    """Chunked, fused KL from hidden states equals the full-logits KL in value and student gradients;
    the teacher side gets no gradient."""
    s_h, head, t_h, t_head, mask = _kl_setup()
    full, n_full = forward_kl_per_token(t_h @ t_head.T, head(s_h), mask, temperature)
    full.backward()
    ref = (s_h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    s_h.grad = head.weight.grad = head.bias.grad = t_h.grad = t_head.grad = None

    loss, n = chunked_kl_from_hidden(s_h, head, t_h, t_head, mask, chunk_tokens=chunk, temperature=temperature)
    loss.backward()
    assert n == n_full == 7
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-7)
    for got, want in zip((s_h.grad, head.weight.grad, head.bias.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert t_h.grad is None and t_head.grad is None
    assert torch.all(s_h.grad[mask == 0] == 0)  # masked positions get no gradient


def test_chunked_kl_computes_each_chunk_once(monkeypatch):
    """The fused KL evaluates each chunk's logits once, in the forward (ceil(7 / 3) = 3 chunks), and backward only
    scales the gradients it already holds: no chunk is recomputed (the checkpointed design did it twice)."""
    from zebra.ops import fused_kl

    calls = []
    real = fused_kl._kl_and_grad

    def spy(s, t, inv_temp, need_grad):
        calls.append((tuple(s.shape), need_grad))
        return real(s, t, inv_temp, need_grad)

    monkeypatch.setattr(fused_kl, "_elementwise", lambda device: spy)
    s_h, head, t_h, t_head, mask = _kl_setup()
    loss, n = chunked_kl_from_hidden(s_h, head, t_h, t_head, mask, chunk_tokens=3)
    assert [c[0][0] for c in calls] == [3, 3, 1] and all(c[1] for c in calls)
    loss.backward()
    assert len(calls) == 3
    with torch.no_grad():  # nothing needs a gradient: none is computed
        chunked_kl_from_hidden(s_h, head, t_h, t_head, mask, chunk_tokens=3)
    assert [c[1] for c in calls[3:]] == [False, False, False]


def test_fused_kl_gradcheck_float64():
    """The closed-form gradient (softmax(s) - softmax(t)) / T, scaled by the incoming gradient, passes gradcheck."""
    from zebra.ops.fused_kl import linear_kl

    torch.manual_seed(1)
    h = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    th, tw = torch.randn(5, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, w, b: linear_kl(h, w, th, tw, chunk_tokens=2, temperature=1.5,
                                                              student_bias=b) * 3.0, (h, w, b))


def test_fused_kl_autocast_matches_fp32():
    """Under bf16 autocast the GEMMs run in bf16 and the KL in fp32: value and gradients within bf16 rounding of
    the fp32 computation, gradients returned in the parameters' dtype (fp32 master weights)."""
    from zebra.ops.fused_kl import linear_kl

    torch.manual_seed(2)
    h = torch.randn(40, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.3).requires_grad_()
    th, tw = torch.randn(40, 12), torch.randn(50, 12) * 0.3
    ref = linear_kl(h, w, th, tw, chunk_tokens=16)
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_kl(h, w, th, tw, chunk_tokens=16)
    got.backward()
    assert got.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(got.item() - ref.item()) / ref.item() < 3e-2
    for a, b in ((h.grad, gh), (w.grad, gw)):
        assert ((a - b).norm() / b.norm()).item() < 3e-2


def test_chunked_kl_bf16_weight_head():
    """A bare bf16 weight as the student head works; the KL itself is computed in float32."""
    s_h, head, t_h, t_head, mask = _kl_setup()
    w = head.weight.detach().to(torch.bfloat16).requires_grad_()
    loss, _ = chunked_kl_from_hidden(s_h.detach().to(torch.bfloat16), w, t_h, t_head, mask, chunk_tokens=4)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad is not None and w.grad.dtype == torch.bfloat16


# ---- DPO -----------------------------------------------------------------------------------------------------
def test_dpo_hand_computed():
    """beta 0.1: pair 1 has margin 0.1*((-1+2) - (-3+2)) = 0.2, pair 2 0.1*((-4+2) - (-1+2)) = -0.3."""
    pc = torch.tensor([-1.0, -4.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)
    rc = torch.tensor([-2.0, -2.0], requires_grad=True)
    rr = torch.tensor([-2.0, -2.0], requires_grad=True)
    loss, m = dpo_loss(pc, pr, rc, rr, beta=0.1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert loss.item() == pytest.approx((-log(sig(0.2)) - log(sig(-0.3))) / 2, rel=1e-6)
    assert m["reward_accuracy"] == 0.5
    assert m["chosen_reward"] == pytest.approx((0.1 - 0.2) / 2)
    assert m["rejected_reward"] == pytest.approx((-0.1 + 0.1) / 2)
    assert m["reward_margin"] == pytest.approx((0.2 - 0.3) / 2)
    loss.backward()
    # d/dpc of -log sig(z)/2 with z = 0.1*(...) is -0.1*(1 - sig(z))/2; the reference gets nothing
    assert pc.grad[0].item() == pytest.approx(-0.1 * (1 - sig(0.2)) / 2, rel=1e-5)
    assert rc.grad is None and rr.grad is None


def test_sequence_logprob_hand_computed():
    """Shifted by one: logits at t-1 score label t; only masked-in labels count; the last logits are unused."""
    logits = torch.tensor([[[0.0, log(3)], [0.0, 0.0], [float("nan"), 0.0]]])  # p(.|<1) = [1/4, 3/4]; p(.|<2) = 1/2
    labels = torch.tensor([[-100, 1, 0]])
    both = sequence_logprob(logits, labels, torch.tensor([[0, 1, 1]]))
    last = sequence_logprob(logits, labels, torch.tensor([[1, 0, 1]]))  # mask[:, 0] is ignored
    assert both.shape == (1,)
    assert both.item() == pytest.approx(log(3 / 4) + log(1 / 2), rel=1e-6)
    assert last.item() == pytest.approx(log(1 / 2), rel=1e-6)


def test_sequence_logprob_masked_label_can_be_ignore_index():
    """A -100 label at a masked-out position is not gathered (no index error) and adds nothing."""
    logits = torch.zeros(2, 3, 4)
    labels = torch.tensor([[0, 2, -100], [0, -100, 3]])
    mask = torch.tensor([[0, 1, 0], [0, 0, 1]])
    torch.testing.assert_close(sequence_logprob(logits, labels, mask), torch.full((2,), log(1 / 4)))


# ---- ILD -----------------------------------------------------------------------------------------------------
def test_ild_loss_masking_and_mixer_term():
    """Mean over the elements of counted tokens; the mixer term adds the same MSE on the mixer outputs."""
    s = torch.tensor([[[1.0, 2.0], [100.0, 100.0]]], requires_grad=True)
    t = torch.zeros(1, 2, 2, requires_grad=True)
    s_mix = torch.tensor([[[3.0, 0.0], [float("nan"), 7.0]]])
    mask = torch.tensor([[1, 0]])
    assert ild_loss(s, t, mask=mask).item() == pytest.approx((1 + 4) / 2)
    assert ild_loss(s, t, s_mix, torch.zeros(1, 2, 2), mask=mask).item() == pytest.approx((1 + 4) / 2 + 9 / 2)
    assert ild_loss(s, t).item() == pytest.approx((1 + 4 + 100**2 + 100**2) / 4)
    ild_loss(s, t, mask=mask).backward()
    assert t.grad is None  # the teacher is the target
    # loss = (s00^2 + s01^2) / 2, so the gradient is s on token 0 and nothing on the masked token
    torch.testing.assert_close(s.grad, torch.tensor([[[1.0, 2.0], [0.0, 0.0]]]))


def test_ild_loss_needs_both_mixers():
    """Passing only one side's mixer output is a mistake, not a silently dropped term."""
    x = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="both"):
        ild_loss(x, x, student_mixer=x)
