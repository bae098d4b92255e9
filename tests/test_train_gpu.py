"""The training fast path on a GPU against its references, forward and backward, on fresh random inputs:
flash varlen attention over packed documents == SDPA with the block-diagonal mask (teacher attention and MLA),
the chunked SSD on CUDA == the recurrence, the fused LM-head KL under bf16 autocast == the full-logits KL, and a
torch.compile'd decoder layer == the eager one (run on a GPU machine: python -m pytest -m gpu tests/test_train_gpu.py)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(120)]
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from test_model import tiny_model  # noqa: E402

from zebra.bench.train import random_batch  # noqa: E402
from zebra.model.common import varlen_available  # noqa: E402


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("kind", ["attention", "mla"])
def test_varlen_attention_equals_masked_sdpa(kind, monkeypatch):
    """Packed rows under bf16 autocast: the varlen path (ctx["varlen"]) gives the logits and gradients of the
    SDPA path with the (B, 1, T, T) document mask (ZEBRA_ATTENTION=sdpa)."""
    assert varlen_available(torch.device("cuda"))
    model = tiny_model([kind, "mamba2", kind], seed=3).cuda().train()
    batch = random_batch(3, 160, 97, "cuda", seed=1, mean_doc=50)
    outs = []
    for mode in ("auto", "sdpa"):
        monkeypatch.setenv("ZEBRA_ATTENTION", mode)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ctx = model.model.context(None, None, 3, 160, 0, torch.float32, torch.device("cuda"), batch["doc_ids"])
            assert (ctx["varlen"] is not None) == (mode == "auto")
            logits = model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits
        logits.float().square().mean().backward()
        outs.append((logits.float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert rel(outs[0][0], outs[1][0]) < 2e-2
    for a, b in zip(outs[0][1], outs[1][1]):
        assert rel(a, b) < 5e-2


def test_chunked_ssd_on_cuda_equals_recurrence():
    from zebra.ops import ssd

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, P, N = 2, 300, 4, 32, 32
    mk = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    x, Bm, Cm = mk(B, T, H, P), mk(B, T, H, N) * 0.3, mk(B, T, H, N) * 0.3
    dt = torch.nn.functional.softplus(mk(B, T, H) - 1)
    A = -torch.rand(H, generator=g, device="cuda") - 0.1
    doc = torch.zeros(B, T, dtype=torch.long, device="cuda")
    doc[0, 70:] = 1
    doc[0, 200:] = 2
    doc[1, 128:] = 1  # a boundary on a chunk edge
    y_ref, f_ref = ssd.ssd_naive(x, dt, A, Bm, Cm, doc_ids=doc)
    y, f = ssd.ssd_chunked(x, dt, A, Bm, Cm, doc_ids=doc)
    assert rel(y, y_ref) < 1e-3 and rel(f, f_ref) < 1e-3


def test_fused_kl_under_autocast_equals_full_logits():
    from zebra.stages.losses import chunked_kl_from_hidden, forward_kl_per_token

    torch.manual_seed(0)
    n, d, V = 3000, 64, 5000
    s_h = torch.randn(1, n, d, device="cuda", requires_grad=True)
    head = torch.nn.Linear(d, V, bias=False).cuda()
    t_h, t_w = torch.randn(1, n, d, device="cuda"), torch.randn(V, d, device="cuda") * 0.2
    ref, _ = forward_kl_per_token(t_h @ t_w.T, head(s_h))
    ref.backward()
    gh, gw = s_h.grad.clone(), head.weight.grad.clone()
    s_h.grad = head.weight.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = chunked_kl_from_hidden(s_h, head, t_h, t_w, chunk_tokens=1024)
    got.backward()
    assert abs(got.item() - ref.item()) / ref.item() < 2e-2
    assert rel(s_h.grad, gh) < 3e-2 and rel(head.weight.grad, gw) < 3e-2


def test_compiled_layers_equal_eager():
    """compile_layers (what zebra run does on CUDA) changes nothing but speed: same loss and gradients."""
    from zebra.stages.distill import make_distill_loss
    from zebra.stages.fastpath import compile_layers

    teacher = tiny_model(["attention"] * 3, seed=0).cuda().to(torch.bfloat16)
    batch = random_batch(4, 256, 97, "cuda", seed=2, mean_doc=80)
    res = []
    for compiled in (False, True):
        student = tiny_model(["mla", "mamba2", "mamba2"], seed=1).cuda().train()
        if compiled:
            compile_layers(student)
            compile_layers(teacher)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _, _ = make_distill_loss(teacher, student)(batch)
        loss.backward()
        res.append((loss.item(), [p.grad.float() for p in student.parameters()]))
    assert abs(res[0][0] - res[1][0]) / res[0][0] < 2e-2
    for a, b in zip(res[0][1], res[1][1]):
        assert rel(b, a) < 5e-2


def test_compiled_layer_does_not_recompile_for_each_document_count(monkeypatch):
    """Packed batches with different document counts in one bucket reuse the compiled layer (no new graph), and
    the padded cu_seqlens (empty documents at the end) give the logits and gradients of the exact ones."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from zebra.stages.fastpath import compile_layers

    def batch(n_docs):
        ids = torch.randint(0, 97, (2, 128), device="cuda", generator=torch.Generator("cuda").manual_seed(n_docs))
        cuts = torch.linspace(0, 128, n_docs + 1, device="cuda")[1:-1].long()
        doc = torch.zeros(2, 128, dtype=torch.long, device="cuda")
        for c in cuts:
            doc[:, c:] += 1
        return ids, doc

    def run(model, n_docs):
        model.zero_grad(set_to_none=True)
        ids, doc = batch(n_docs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids, doc_ids=doc).logits
        logits.float().square().mean().backward()
        return logits.float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    model = tiny_model(["mla", "mamba2", "attention"], seed=4).cuda().train()
    monkeypatch.setenv("ZEBRA_VARLEN_BUCKET", "0")
    exact = run(model, 5)
    monkeypatch.setenv("ZEBRA_VARLEN_BUCKET", "1")
    padded = run(model, 5)  # 2 rows x 5 documents = 10 pieces -> cu_seqlens of 11 -> 16
    assert rel(padded[0], exact[0]) < 1e-2
    for a, b in zip(padded[1], exact[1]):
        assert rel(a, b) < 2e-2
    torch._dynamo.reset()
    compile_layers(model)
    run(model, 5)
    graphs = counters["stats"]["unique_graphs"]
    for n in (6, 7, 4):  # 8 .. 14 pieces: the same bucket of 16
        run(model, n)
    assert counters["stats"]["unique_graphs"] == graphs
