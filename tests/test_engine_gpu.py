"""The fast generation path on a GPU (static cache + CUDA graph + Triton decode kernels) against the reference
path on the same model: greedy tokens equal in fp32, logits within bf16 tolerance for the first steps.
Run on a GPU machine: python -m pytest -m gpu tests/test_engine_gpu.py"""

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from zebra import ZebraConfig, ZebraForCausalLM  # noqa: E402
from zebra.generation import StaticEngine  # noqa: E402
from zebra.ops import dispatch  # noqa: E402

SMOL = dict(vocab_size=1000, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
            kv_lora_rank=64, qk_rope_head_dim=32, rope_config={"rope_type": "default", "rope_theta": 100000.0})


def model_for(mixers, dtype, seed=0):
    torch.manual_seed(seed)
    cfg = ZebraConfig(num_hidden_layers=len(mixers), mixer_types=mixers, **SMOL)
    model = ZebraForCausalLM(cfg).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
        for layer in model.model.layers:
            if layer.mixer_type == "mamba2":
                layer.mamba.reset_ssm_parameters()
    return model.to(dtype)


MIXERS = ["mla", "mamba2", "attention", "mamba2", "mla", "mamba2"]


def test_graph_engine_greedy_equals_reference_fp32():
    model = model_for(MIXERS, torch.float32)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(1, 1000, (3, 37), generator=g, device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :30] = 0
    dispatch.set_backend("torch")
    try:
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, pad_token_id=0)
    finally:
        dispatch.set_backend("auto")
    eng = StaticEngine(model, 3, 128, cuda_graph=True)
    fast = eng.generate(ids, mask, max_new_tokens=48)
    assert fast.tolist() == ref.tolist()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.bfloat16, 5e-2)])
def test_graph_engine_logits_track_full_forward(dtype, tol):
    """Teacher-forced steps through the captured graph == one full reference forward, step by step."""
    model = model_for(MIXERS, dtype, seed=2)
    ids = torch.randint(1, 1000, (2, 80), generator=torch.Generator(device="cuda").manual_seed(3), device="cuda")
    dispatch.set_backend("torch")
    try:
        with torch.no_grad():
            full = model(ids, use_cache=False).logits.float()
    finally:
        dispatch.set_backend("auto")
    eng = StaticEngine(model, 2, 96, cuda_graph=True)
    got = [eng.prefill(ids[:, :16]).float()]
    for t in range(16, 79):
        got.append(eng.step(ids[:, t]).float().clone())
    got = torch.stack(got, 1)
    want = full[:, 15:79]
    err = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
    assert err < tol, err


def test_static_generate_through_transformers_api():
    model = model_for(["mamba2", "mla", "mamba2"], torch.bfloat16)
    ids = torch.randint(1, 1000, (1, 12), device="cuda")
    out = model.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation="static", pad_token_id=0)
    assert out.shape == (1, 32) and model._zebra_engines[1].graph is not None
