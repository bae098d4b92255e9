"""The Triton decode kernels run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1) against the
PyTorch references: split-K attention (GQA, and MLA with V a narrow view of the latent rows) and the fused
Mamba2 step over several tokens. Skipped when triton is not installed (it is not a CPU dependency)."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.interpret
triton = pytest.importorskip("triton")
if torch.cuda.is_available():  # the kernels are tested on the GPU there (tests/test_decode_kernels_gpu.py)
    pytest.skip("GPU machine: see tests/test_decode_kernels_gpu.py", allow_module_level=True)

if os.environ.get("TRITON_INTERPRET") != "1":
    # triton picks interpreter or compiler when it is first imported, and other test modules import it first:
    # run this file's tests in a fresh interpreter process.
    def test_kernels_under_the_triton_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                           env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert " passed" in r.stdout and "failed" not in r.stdout

else:
    from zebra.kernels import decode as kern
    from zebra.ops import decode as ref

    @pytest.mark.parametrize("case", ["gqa", "mla"])
    @pytest.mark.parametrize("nsplit", [1, 3])
    def test_decode_attention_kernel_matches_reference(case, nsplit):
        g = torch.Generator().manual_seed(nsplit)
        B, S = 3, 150
        if case == "gqa":
            G, M, D = 2, 3, 32
            q = torch.randn(B, G, M, D, generator=g)
            k, v = torch.randn(B, G, S, D, generator=g), torch.randn(B, G, S, D, generator=g)
        else:
            G, M, R, dr = 1, 5, 72, 16  # DK = 88, DV = 72: not powers of two, two merge column blocks
            q = torch.randn(B, G, M, R + dr, generator=g)
            cache = torch.randn(B, S, R + dr, generator=g)
            k, v = cache[:, None], cache[:, None, :, :R]
        kv_start = torch.tensor([0, 7, 100], dtype=torch.int32)
        kv_len = torch.tensor([150, 70, 101], dtype=torch.int32)
        want = ref.decode_attention(q, k, v, kv_start, kv_len, 0.2)
        got = kern.decode_attention(q, k, v, kv_start, kv_len, 0.2, num_splits=nsplit)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


    @pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("H,n_kv,P,N", [(4, 2, 16, 16), (3, 1, 24, 20)])
    def test_mamba2_step_kernel_matches_reference_over_steps(H, n_kv, P, N, state_dtype):
        g = torch.Generator().manual_seed(H)
        B, K = 2, 4
        C = n_kv * P + n_kv * N + H * N
        w, bias = torch.randn(C, K, generator=g) * 0.5, torch.randn(C, generator=g) * 0.1
        dt_bias, A_log, D = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.5, torch.randn(H, generator=g)
        rings = [torch.zeros(B, C, K) for _ in range(2)]
        states = [torch.zeros(B, H, P, N, dtype=state_dtype) for _ in range(2)]  # bf16: stored rounded
        for t in range(6):  # crosses the ring's wrap-around
            xBC, dt = torch.randn(B, C, generator=g), torch.randn(B, H, generator=g) * 2
            pos = torch.tensor([t])
            if state_dtype != torch.float32:  # each step from the same rounded state: one rounding compared
                states[1].copy_(states[0])
            want = ref.mamba2_step(xBC, rings[0], pos, w, bias, dt, dt_bias, A_log, D, states[0], n_kv, P, N)
            got = kern.mamba2_step(xBC, rings[1], pos, w, bias, dt, dt_bias, A_log, D, states[1], n_kv, P, N)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)  # the readout uses the unrounded state
            torch.testing.assert_close(rings[1], rings[0])
            if state_dtype == torch.float32:
                torch.testing.assert_close(states[1], states[0], atol=1e-5, rtol=1e-4)
            else:  # the same fp32 value rounded once: at most one bf16 ulp (<= 2^-7 relative) apart (Triton's
                # interpreter truncates where the GPU and PyTorch round to nearest)
                torch.testing.assert_close(states[1].float(), states[0].float(), atol=1e-6, rtol=2 ** -7)


    def test_fused_elementwise_kernels_match_reference():
        from zebra.kernels import fused as fk
        from zebra.ops import fused as fr

        g = torch.Generator().manual_seed(0)
        h, x, w = torch.randn(3, 1, 40, generator=g), torch.randn(3, 1, 40, generator=g), torch.randn(40, generator=g)
        for a, b in zip(fk.add_rms_norm(h, x, w, 1e-5), fr.add_rms_norm(h, x, w, 1e-5)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fk.add_rms_norm(h, None, w, 1e-5)[1], fr.rms_norm(h, w, 1e-5), atol=1e-5, rtol=1e-5)
        z = torch.randn(3, 50, generator=g)[:, None, 5:45]  # a strided view, as the in_proj split gives
        torch.testing.assert_close(fk.gated_rms_norm(x, z, w, 1e-5), fr.gated_rms_norm(x, z, w, 1e-5), atol=1e-5, rtol=1e-5)
        q = torch.randn(3, 1, 5, 24, generator=g)[..., 8:]  # (B, 1, H, 16), strided like MLA's q_rope slice
        cos, sin = torch.randn(3, 1, 16, generator=g), torch.randn(3, 1, 16, generator=g)
        torch.testing.assert_close(fk.rope(q, cos, sin), fr.rope(q, cos, sin), atol=1e-5, rtol=1e-5)
        u, v = torch.randn(3, 1, 2000, generator=g), torch.randn(3, 1, 2000, generator=g)
        torch.testing.assert_close(fk.silu_mul(u, v), fr.silu_mul(u, v), atol=1e-5, rtol=1e-5)
