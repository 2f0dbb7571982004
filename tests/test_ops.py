"""The linear products behind the model: oneDNN on x86 CPUs (forward), F.linear elsewhere and for gradients."""
import pytest
import torch
import torch.nn.functional as F

from minitir import ops

pytestmark = pytest.mark.quick   # the inner loop: pytest -m quick


def _data(bias: bool, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 5, 24, generator=g, dtype=torch.float64).float()
    w = torch.randn(40, 24, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_values_and_gradients_equal_f_linear(monkeypatch, onednn, bias):
    monkeypatch.setattr(ops, "_ONEDNN", onednn and ops._ONEDNN)
    x, w, b = _data(bias)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    y = ops.linear(leaves[0], leaves[1], leaves[2] if bias else None)
    y_ref = F.linear(ref[0], ref[1], ref[2] if bias else None)
    assert y.shape == y_ref.shape == (3, 5, 40)
    assert (y - y_ref).abs().max() < 1e-5
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    for a, r in zip(leaves, ref):
        assert (a.grad - r.grad).abs().max() < 1e-4
    with torch.no_grad():  # the inference path (no autograd node)
        assert (ops.linear(x, w, b) - y_ref).abs().max() < 1e-5


def test_packed_weights_group_products_live_on_their_module_and_follow_every_change():
    """Decoding's products (no autograd, few rows, an owner) use weights packed once and kept on the owning
    module; an in-place update, a new dtype either way or new data packs again (never a stale copy)."""
    lins = [torch.nn.Linear(24, n, bias=True) for n in (16, 8, 8)]  # q/k/v-like: one input, three outputs
    x = torch.randn(4, 24)

    def check(dtype=torch.float32, tol=1e-5):
        with torch.no_grad():
            ys = ops._products(x.to(dtype), [m.weight for m in lins], [m.bias for m in lins], owner=lins[0])
        for y, m in zip(ys, lins):
            assert y.dtype == dtype and (y.float() - F.linear(x, m.weight.float(), m.bias.float())).abs().max() < tol
        return lins[0].__dict__.get("_onednn_packed")

    first = check()
    assert (first is not None) == ops._ONEDNN
    assert check() is first                                   # kept for the next call
    with torch.no_grad():
        lins[1].weight.mul_(2.0)   # an optimizer step between calls
        lins[2].bias.add_(1.0)
    assert check() is not first or not ops._ONEDNN
    if ops._BF16:
        for m in lins:
            m.to(torch.bfloat16)   # the parameters keep their identity; their data and dtype change
        assert check(torch.bfloat16, 0.1).weight.dtype == torch.bfloat16
        for m in lins:
            m.to(torch.float32)
        assert check().weight.dtype == torch.float32
    with torch.no_grad():
        lins[0].weight.data = torch.randn(16, 24)   # new storage
    check()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_product_is_the_same_bits_whatever_shares_it(dtype):
    """Batch invariance of every product path (packed, unpacked, under autocast from float32 weights): the
    first rows' results do not change with the number of rows (1-1,030: kernels switch algorithm below 4
    rows) or of threads."""
    if dtype == torch.bfloat16 and not ops._BF16:
        pytest.skip("this CPU has no native bfloat16 products")
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(96, 80, bias=False)
    x = torch.randn(1030, 96, generator=g).to(dtype)
    low = lin.weight.detach().to(dtype)
    paths = {"unpacked": lambda t: ops._products(t, [low], [None])[0],
             "packed": lambda t: ops._products(t, [low], [None], owner=lin)[0],
             "autocast": lambda t: _under_autocast(dtype, lambda: ops._products(t, [lin.weight], [None])[0])}
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            ref = paths["unpacked"](x[:1])
            for name, f in paths.items():
                if name == "autocast" and dtype == torch.float32:
                    continue
                for n_threads in (1, 2):
                    torch.set_num_threads(n_threads)
                    for M in (1, 2, 3, 4, 5, 17, 256, 1030):
                        assert torch.equal(f(x[:M])[:1], ref), (name, n_threads, M)
    finally:
        torch.set_num_threads(threads)


def _under_autocast(dtype, f):
    with torch.autocast("cpu", dtype=dtype):
        return f()


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_layers_under_cpu_bfloat16_autocast_give_autocasts_values_and_gradients(recompute):
    """The GPU recipe on a CPU: the norm/MLP functions with hand-written backward passes, run under bfloat16
    autocast with float32 weights, must give what plain autograd under the same autocast gives, with float32
    gradients for the float32 weights. Their backward runs under forward's autocast state (ops.amp_backward):
    without it, backward mixes bfloat16 gradients with float32 weights."""
    from minitir.model import RMSNorm
    torch.manual_seed(0)
    D, H = 32, 64
    norm = RMSNorm(D, 1e-6)
    norm.weight.data.uniform_(0.5, 1.5)
    gate, up, down = (torch.nn.Linear(i, o, bias=False) for i, o in ((D, H), (D, H), (H, D)))
    x = torch.randn(10, D, requires_grad=True)
    params = [x, norm.weight, gate.weight, up.weight, down.weight]
    ref = [p.detach().clone().requires_grad_() for p in params]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.mlp(x, norm, gate, up, down, recompute=recompute)
        xf = ref[0].float()
        n = ref[1] * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))
        y_ref = F.linear(F.silu(F.linear(n, ref[2])) * F.linear(n, ref[3]), ref[4])
    assert y.dtype == y_ref.dtype == torch.bfloat16
    assert (y.float() - y_ref.float()).abs().max() < 2e-2
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    for p, r in zip(params, ref):
        assert p.grad.dtype == torch.float32
        assert (p.grad - r.grad).abs().max() <= 3e-2 * r.grad.abs().max()


@pytest.mark.skipif(not (ops._ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
                    reason="no oneDNN with native bfloat16 products here")
def test_bfloat16_decoding_uses_packed_onednn_weights():
    """A bfloat16 decode copy on a CPU that multiplies bfloat16 natively decodes from packed oneDNN weights
    (the products that make bfloat16 worth it there), with F.linear's values."""
    lins = [torch.nn.Linear(24, n, bias=False).to(torch.bfloat16) for n in (16, 8)]
    x = torch.randn(4, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        ys = ops._products(x, [m.weight for m in lins], [None, None], owner=lins[0])
    assert lins[0]._onednn_packed.weight.dtype == torch.bfloat16
    for y, m in zip(ys, lins):
        assert y.dtype == torch.bfloat16
        assert (y.float() - F.linear(x, m.weight).float()).abs().max() < 2e-2


def _threads(n, f):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return f()
    finally:
        torch.set_num_threads(before)


def test_float32_silu_is_the_same_bits_wherever_a_value_falls():
    """F.silu's float32 kernel rounds its vectorised loop and its scalar tail differently (a strided view runs
    the scalar loop): ops.silu gives one value per input, close to F.silu's."""
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * 6
    assert torch.equal(ops.silu(x)[::2], ops.silu(x[::2]))
    assert not torch.equal(F.silu(x)[::2], F.silu(x[::2]))     # what it avoids
    assert torch.allclose(ops.silu(x), F.silu(x), rtol=1e-6, atol=1e-7)


def test_reductions_are_the_same_bits_on_any_thread_count():
    """tree_sum (the gradient norm's) and the trainer's row dot products (entropy, one row included) do not
    depend on how many threads share them; torch's own sum of one long vector does."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3_000_017, generator=g)
    sums = [_threads(n, lambda: ops.tree_sum(x)) for n in (1, 2, 3)]
    assert sums[0] == sums[1] == sums[2] and abs(float(sums[0]) - float(x.double().sum())) < 1e-2
    from minitir.logprobs import _row_dot
    a, b = torch.rand(1, 151_936, generator=g), torch.randn(1, 151_936, generator=g)
    dots = [_threads(n, lambda: _row_dot(a, b)) for n in (1, 2, 3)]
    assert torch.equal(dots[0], dots[1]) and torch.equal(dots[0], dots[2])


def test_a_computed_weight_is_never_packed():
    """Only a module's own parameters are packed: a weight computed on each call (LoRA's W0 + BA) would match a
    stale packing once it lands at a freed address; its products must follow every change."""
    from minitir.lora import LoRALinear
    lin = LoRALinear(torch.nn.Linear(24, 16, bias=False), rank=2, alpha=4.0)
    x = torch.randn(4, 24)
    with torch.no_grad():
        for step in range(3):
            lin.lora_B.add_(0.1)
            y = ops._products(x, [lin.weight], [None], owner=lin)[0]
            assert torch.allclose(y, F.linear(x, lin.weight), atol=1e-6) and "_onednn_packed" not in lin.__dict__
