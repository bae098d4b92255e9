"""The Triton decode kernels against their PyTorch references on the GPU, fresh random inputs, fp32 and bf16,
at the real shapes (SmolLM2-135M, Llama-8B GQA, Zebra-8B MLA), and inside a captured CUDA graph whose
lengths / position change between replays. Run: python -m pytest -m gpu tests/test_decode_kernels_gpu.py"""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
kern = pytest.importorskip("zebra.kernels.decode")

from zebra.ops import decode as ref  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def attn_inputs(case, B, S, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    if case == "gqa-8b":
        q, k, v = mk(B, 8, 4, 128), mk(B, 8, S, 128), mk(B, 8, S, 128)
        return q, k, v, 128**-0.5
    if case == "gqa-smol":
        q, k, v = mk(B, 3, 3, 64), mk(B, 3, S, 64), mk(B, 3, S, 64)
        return q, k, v, 64**-0.5
    R, dr, H = (160, 64, 32) if case == "mla-8b" else (64, 32, 9)
    cache = mk(B, S, R + dr)
    return mk(B, 1, H, R + dr), cache[:, None], cache[:, None, :, :R], 128**-0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["gqa-8b", "gqa-smol", "mla-8b", "mla-smol"])
@pytest.mark.parametrize("nsplit", [1, None])
def test_decode_attention_matches_reference(case, dtype, nsplit):
    B, S = 3, 4096
    q, k, v, scale = attn_inputs(case, B, S, dtype, seed=hash(case) % 1000)
    kv_start = torch.tensor([0, 17, 1000], dtype=torch.int32, device="cuda")
    kv_len = torch.tensor([4096, 2049, 1001], dtype=torch.int32, device="cuda")
    want = ref.decode_attention(q.float(), k.float(), v.float(), kv_start, kv_len, scale)
    got = kern.decode_attention(q, k, v, kv_start, kv_len, scale, num_splits=nsplit)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("H,n_kv,P", [(9, 3, 64), (32, 8, 128)])
def test_mamba2_step_matches_reference(H, n_kv, P, dtype):
    g = torch.Generator(device="cuda").manual_seed(H)
    B, K, N = 4, 4, P
    C = n_kv * P + n_kv * N + H * N
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    w, bias = (mk(C, K) * 0.5).to(dtype), (mk(C) * 0.1).to(dtype)
    dt_bias, A_log, D = mk(H), mk(H) * 0.5, mk(H)
    rings = [torch.zeros(B, C, K, device="cuda", dtype=dtype) for _ in range(2)]
    states = [torch.zeros(B, H, P, N, device="cuda") for _ in range(2)]
    for t in range(7):
        xBC, dt = mk(B, C).to(dtype), mk(B, H)
        pos = torch.tensor([t], device="cuda")
        want = ref.mamba2_step(xBC, rings[0], pos, w, bias, dt, dt_bias, A_log, D, states[0], n_kv, P, N)
        got = kern.mamba2_step(xBC, rings[1], pos, w, bias, dt, dt_bias, A_log, D, states[1], n_kv, P, N)
        assert rel(got, want) < TOL[torch.float32] * 10
        assert torch.equal(rings[1], rings[0])
        assert rel(states[1], states[0]) < TOL[torch.float32] * 10


@pytest.mark.parametrize("H,n_kv,P", [(9, 3, 64), (32, 8, 128)])
def test_mamba2_step_with_a_bf16_state(H, n_kv, P):
    """A bf16 state: fp32 arithmetic, the readout from the unrounded state, rounded to nearest once when stored
    (bit-equal to PyTorch's rounding of the same fp32 value, up to the fp32 sums' last bits)."""
    g = torch.Generator(device="cuda").manual_seed(H)
    B, K, N = 4, 4, P
    C = n_kv * P + n_kv * N + H * N
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    w, bias = (mk(C, K) * 0.5).bfloat16(), (mk(C) * 0.1).bfloat16()
    dt_bias, A_log, D = mk(H), mk(H) * 0.5, mk(H)
    rings = [torch.zeros(B, C, K, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    states = [torch.zeros(B, H, P, N, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    for t in range(7):
        xBC, dt = mk(B, C).bfloat16(), mk(B, H)
        pos = torch.tensor([t], device="cuda")
        states[1].copy_(states[0])  # the same rounded state in: one step's rounding compared
        want = ref.mamba2_step(xBC, rings[0], pos, w, bias, dt, dt_bias, A_log, D, states[0], n_kv, P, N)
        got = kern.mamba2_step(xBC, rings[1], pos, w, bias, dt, dt_bias, A_log, D, states[1], n_kv, P, N)
        assert rel(got, want) < TOL[torch.float32] * 10
        assert torch.equal(rings[1], rings[0])
        diff = (states[1].float() - states[0].float()).abs()
        assert bool((diff <= states[0].float().abs() * 2 ** -7 + 1e-6).all())  # at most one bf16 ulp
        assert (diff > 0).float().mean() < 0.01  # and almost all equal: round to nearest, like PyTorch


def test_kernels_replay_in_a_cuda_graph():
    """Captured once; kv_len / pos change in place between replays, results follow (no host-side state)."""
    q, k, v, scale = attn_inputs("mla-8b", 2, 2048, torch.bfloat16, seed=5)
    kv_start = torch.zeros(2, dtype=torch.int32, device="cuda")
    kv_len = torch.full((2,), 10, dtype=torch.int32, device="cuda")
    kern.decode_attention(q, k, v, kv_start, kv_len, scale)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kern.decode_attention(q, k, v, kv_start, kv_len, scale)
    for n in (10, 700, 2048):
        kv_len.fill_(n)
        graph.replay()
        want = ref.decode_attention(q.float(), k.float(), v.float(), kv_start, kv_len, scale)
        assert rel(out, want) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_elementwise_kernels_match_reference(dtype):
    from zebra.kernels import fused as fk
    from zebra.ops import fused as fr

    g = torch.Generator(device="cuda").manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda").to(dtype)  # noqa: E731
    h, x, w = mk(4, 1, 4096), mk(4, 1, 4096), mk(4096)
    for a, b in zip(fk.add_rms_norm(h, x, w, 1e-5), fr.add_rms_norm(h, x, w, 1e-5)):
        assert rel(a, b) < TOL[dtype]
    z = mk(4, 9000)[:, None, 100:4196]
    assert rel(fk.gated_rms_norm(x, z, w, 1e-5), fr.gated_rms_norm(x, z, w, 1e-5)) < TOL[dtype]
    q = mk(4, 1, 32, 192)[..., 128:]
    cos, sin = mk(4, 1, 64), mk(4, 1, 64)
    assert rel(fk.rope(q, cos, sin), fr.rope(q, cos, sin)) < TOL[dtype]
    u, v = mk(4, 1, 14336), mk(4, 1, 14336)
    assert rel(fk.silu_mul(u, v), fr.silu_mul(u, v)) < TOL[dtype]
