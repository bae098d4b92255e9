"""GPU kernels against their pure-PyTorch references on fresh random inputs, forward and backward, fp32 and
bf16 (run on a GPU machine: python -m pytest -m gpu tests/test_kernels_gpu.py)."""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
fla_ops = pytest.importorskip("zebra.kernels.fla_ops")

from zebra.ops import conv, ssd  # noqa: E402

TOL = {torch.float32: 2e-3, torch.bfloat16: 3e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def ssd_inputs(B, T, H, P, N, dtype, seed, grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    x, Bm, Cm = mk(B, T, H, P), mk(B, T, H, N) * 0.3, mk(B, T, H, N) * 0.3
    dt = torch.nn.functional.softplus(mk(B, T, H).float() - 1)
    A = -torch.rand(H, generator=g, device="cuda") * 2 - 0.1
    if grad:
        for t in (x, Bm, Cm, dt):
            t.requires_grad_(True)
    return x, dt, A, Bm, Cm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [64, 200])
def test_ssd_scan_kernel_matches_reference(dtype, T):
    """fla's chunk_simple_gla mapping == ssd_chunked (outputs and final state), with an initial state."""
    x, dt, A, Bm, Cm = ssd_inputs(2, T, 4, 32, 32, dtype, seed=T)
    s0 = torch.randn(2, 4, 32, 32, device="cuda") * 0.1
    y_ref, f_ref = ssd.ssd_chunked(x.float(), dt, A, Bm.float(), Cm.float(), s0)
    y, f = fla_ops.ssd_scan(x, dt, A, Bm, Cm, initial_state=s0)
    assert rel(y, y_ref) < TOL[dtype] and rel(f, f_ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_scan_kernel_packed_and_backward(dtype):
    """With packed documents (cu_seqlens) the kernel equals the reference with doc_ids, values and gradients."""
    T = 150
    doc = torch.tensor([[0] * 40 + [1] * 70 + [2] * 40, [0] * 150], device="cuda")
    ins = ssd_inputs(2, T, 4, 32, 32, dtype, seed=7, grad=True)
    ref_ins = [t.detach().clone().requires_grad_(t.requires_grad) for t in ins]
    y, _ = fla_ops.ssd_scan(*ins, doc_ids=doc)
    x, dt, A, Bm, Cm = ref_ins
    y_ref, _ = ssd.ssd_chunked(x.float(), dt, A, Bm.float(), Cm.float(), doc_ids=doc)
    assert rel(y, y_ref) < TOL[dtype]
    gy = torch.randn_like(y_ref)
    (y * gy).sum().backward()
    (y_ref * gy).sum().backward()
    for a, b in zip(ins, ref_ins):
        if a.requires_grad:
            assert rel(a.grad, b.grad) < 3 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_kernel_matches_reference(dtype):
    """fla's causal conv1d == the reference, continuing from a carried state, and with packed documents."""
    g = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(2, 37, 96, generator=g, device="cuda").to(dtype)
    w = torch.randn(96, 1, 4, generator=g, device="cuda").to(dtype)
    b = torch.randn(96, generator=g, device="cuda").to(dtype)
    st = torch.randn(2, 96, 3, generator=g, device="cuda").to(dtype)
    y, s = fla_ops.causal_conv1d(x, w, b, st)
    y_ref, s_ref = conv.causal_conv1d(x.float(), w.float(), b.float(), st.float())
    assert rel(y, y_ref) < TOL[dtype] and rel(s, s_ref) < TOL[dtype]
    doc = torch.tensor([[0] * 10 + [1] * 27, [0] * 37], device="cuda")
    y, _ = fla_ops.causal_conv1d(x, w, b, doc_ids=doc)
    y_ref, _ = conv.causal_conv1d(x.float(), w.float(), b.float(), doc_ids=doc)
    assert rel(y, y_ref) < TOL[dtype]


def test_model_fast_path_matches_reference_path():
    """A hybrid on the GPU: logits with backend auto (kernels) == backend torch, fp32, packed and plain."""
    from zebra import ZebraConfig, ZebraForCausalLM
    from zebra.ops import dispatch

    torch.manual_seed(0)
    cfg = ZebraConfig(vocab_size=101, hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, mixer_types=["mla", "mamba2", "mamba2"],
                      kv_lora_rank=32, qk_rope_head_dim=16)
    model = ZebraForCausalLM(cfg).cuda().eval()
    ids = torch.randint(0, 101, (2, 130), device="cuda")
    doc = (torch.arange(130, device="cuda") >= 50).long().expand(2, -1)
    outs = {}
    for b in ("torch", "auto"):
        dispatch.set_backend(b)
        with torch.no_grad():
            outs[b] = (model(ids, use_cache=False).logits, model(ids, doc_ids=doc).logits)
    dispatch.set_backend("auto")
    for a, r in zip(outs["auto"], outs["torch"]):
        assert rel(a, r) < 2e-3
