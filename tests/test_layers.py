"""Layer-level checks: the Mamba block, the CPU selective scan and the low-rank attention."""

import torch
import torch.nn.functional as F
import pytest

import model.layers.lsa as lsa_module
from model.layers.lsa import CausalLowRankAttention, LowRankAttention, prefix_softmax_pool
from model.layers.mamba import Mamba
from model.ops.selective_scan import (_SelectiveRecurrence, selective_scan_cpu,
                                      selective_scan_loop)

# mamba_ssm.modules.mamba_simple.Mamba(d_model=64, d_state=32, d_conv=4, expand=2)
MAMBA_SSM_SHAPES = {
    "in_proj.weight": (256, 64),
    "conv1d.weight": (128, 1, 4),
    "conv1d.bias": (128,),
    "x_proj.weight": (4 + 64, 128),
    "dt_proj.weight": (128, 4),
    "dt_proj.bias": (128,),
    "A_log": (128, 32),
    "D": (128,),
    "out_proj.weight": (64, 128),
}



# ------------------------------------------------------------------------ Mamba block

def test_mamba_state_dict_matches_mamba_ssm():
    block = Mamba(d_model=64, d_state=32, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes == MAMBA_SSM_SHAPES


def test_mamba_load_state_dict_round_trip():
    torch.manual_seed(0)
    block = Mamba(d_model=64, d_state=32, d_conv=4, expand=2)
    weights = {k: torch.randn(shape) for k, shape in MAMBA_SSM_SHAPES.items()}
    result = block.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    loaded = block.state_dict()
    assert set(loaded) == set(weights)
    for k, v in weights.items():
        assert torch.equal(loaded[k], v), k
    # and into a second block through the first one's state_dict
    other = Mamba(d_model=64, d_state=32, d_conv=4, expand=2)
    other.load_state_dict(loaded)
    x = torch.randn(2, 5, 64) * 0.1
    with torch.no_grad():
        assert torch.equal(block(x), other(x))


def test_mamba_step_equals_forward_over_200_tokens():
    torch.manual_seed(1)
    block = Mamba(d_model=16, d_state=8, d_conv=4, expand=2).eval()
    batch, length = 2, 200
    x = torch.randn(batch, length, 16)
    with torch.no_grad():
        full = block(x)
        conv_state, ssm_state = block.allocate_inference_cache(batch)
        outs = []
        for t in range(length):
            y, conv_state, ssm_state = block.step(x[:, t:t + 1], conv_state, ssm_state)
            assert y.shape == (batch, 1, 16)
            outs.append(y)
        stepped = torch.cat(outs, dim=1)
    assert full.abs().max() > 1e-3            # not a trivially-zero comparison
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ selective scan

def _scan_inputs(batch=2, dim=3, length=7, d_state=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        u=r(batch, dim, length),
        delta=r(batch, dim, length) * 0.5,
        A=-torch.exp(r(dim, d_state) * 0.5),
        B=r(batch, d_state, length),
        C=r(batch, d_state, length),
        D=r(dim),
        z=r(batch, dim, length),
        delta_bias=r(dim) * 0.1,
    )


def test_selective_scan_cpu_matches_loop_forward_and_gradients():
    inputs = _scan_inputs()
    names = list(inputs)

    def run(fn):
        leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        y = fn(**leaves, delta_softplus=True)
        weights = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)
        (y.double() * weights).sum().backward()
        return y.detach().double(), {k: leaves[k].grad.double() for k in names}

    y_ref, g_ref = run(selective_scan_loop)       # float64 autograd reference
    y_cpu, g_cpu = run(selective_scan_cpu)        # runs its scan in fp32
    torch.testing.assert_close(y_cpu, y_ref, rtol=1e-4, atol=1e-5)
    for k in names:
        assert g_cpu[k].abs().max() > 0, k
        torch.testing.assert_close(g_cpu[k], g_ref[k], rtol=1e-4, atol=1e-4, msg=k)


def test_selective_scan_cpu_without_optional_terms_matches_loop():
    inputs = _scan_inputs(seed=3, dtype=torch.float32)
    core = {k: inputs[k] for k in ("u", "delta", "A", "B", "C")}
    torch.testing.assert_close(selective_scan_cpu(**core), selective_scan_loop(**core),
                               rtol=1e-5, atol=1e-5)
    # the output keeps the input's dtype
    assert selective_scan_cpu(**core).dtype == torch.float32


def test_selective_recurrence_gradcheck_double():
    g = torch.Generator().manual_seed(5)
    batch, length, dim, n = 2, 4, 3, 2
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    delta = (F.softplus(r(batch, length, dim))).requires_grad_()
    A = (-torch.exp(r(dim, n) * 0.3)).requires_grad_()
    du = r(batch, length, dim).requires_grad_()
    B = r(batch, length, n).requires_grad_()
    C = r(batch, length, n).requires_grad_()
    h0 = r(batch, dim, n).requires_grad_()
    # both outputs (y and the last state) take part in the checked gradient
    assert torch.autograd.gradcheck(_SelectiveRecurrence.apply, (delta, A, du, B, C, h0),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_selective_scan_last_state_and_initial_state_split():
    inputs = _scan_inputs(length=20, seed=7, dtype=torch.float32)
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in
                                     ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    kw = dict(D=D, delta_bias=bias, delta_softplus=True)

    y_all, last_all = selective_scan_cpu(u, delta, A, B, C, z=z, return_last_state=True, **kw)
    assert last_all.shape == (2, 3, 4)

    # the last state equals the hand-run recurrence
    d = F.softplus(delta + bias[None, :, None])
    h = torch.zeros(2, 3, 4)
    for t in range(20):
        h = torch.exp(d[:, :, t, None] * A) * h + (d[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
    torch.testing.assert_close(last_all, h, rtol=1e-5, atol=1e-6)

    y1, last1 = selective_scan_cpu(u[..., :10], delta[..., :10], A, B[..., :10], C[..., :10],
                                   z=z[..., :10], return_last_state=True, **kw)
    y2, last2 = selective_scan_cpu(u[..., 10:], delta[..., 10:], A, B[..., 10:], C[..., 10:],
                                   z=z[..., 10:], return_last_state=True, initial_state=last1,
                                   **kw)
    torch.testing.assert_close(y1, y_all[..., :10], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y2, y_all[..., 10:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(last2, last_all, rtol=1e-5, atol=1e-6)
    # without the carried state the second half differs: the check above is meaningful
    y2_fresh = selective_scan_cpu(u[..., 10:], delta[..., 10:], A, B[..., 10:], C[..., 10:],
                                  z=z[..., 10:], **kw)
    assert (y2_fresh - y_all[..., 10:]).abs().max() > 1e-3


# ------------------------------------------------------------------------ low-rank attention

def naive_prefix_pool(logits, values):
    batch, length, p = logits.shape
    out = torch.empty(batch, length, p, values.shape[-1], dtype=torch.float64)
    lg, vs = logits.double(), values.double()
    for t in range(length):
        w = torch.softmax(lg[:, :t + 1], dim=1)                     # (b, t+1, p)
        out[:, t] = torch.einsum("bsp,bsd->bpd", w, vs[:, :t + 1])
    return out


def test_prefix_softmax_pool_one_block_and_many_blocks_agree_with_naive(monkeypatch):
    torch.manual_seed(2)
    logits, values = torch.randn(3, 12, 5), torch.randn(3, 12, 8)
    assert 12 <= lsa_module.POOL_BLOCK
    one_block = prefix_softmax_pool(logits, values)
    assert one_block.shape == (3, 12, 5, 8)
    naive = naive_prefix_pool(logits, values)
    torch.testing.assert_close(one_block.double(), naive, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(lsa_module, "POOL_BLOCK", 5)         # blocks of 5, 5 and 2
    torch.testing.assert_close(prefix_softmax_pool(logits, values), one_block,
                               rtol=1e-5, atol=1e-5)
    # position 0 pools only the first value
    torch.testing.assert_close(one_block[:, 0], values[:, :1].expand(-1, 5, -1))


@pytest.mark.parametrize("block", [64, 4])
def test_prefix_softmax_pool_large_logit_spread(monkeypatch, block):
    torch.manual_seed(4)
    logits, values = torch.randn(2, 30, 4) * 50, torch.randn(2, 30, 6)
    monkeypatch.setattr(lsa_module, "POOL_BLOCK", block)
    pooled = prefix_softmax_pool(logits, values)
    assert torch.isfinite(pooled).all()
    torch.testing.assert_close(pooled.double(), naive_prefix_pool(logits, values),
                               rtol=1e-5, atol=1e-5)


def test_prefix_softmax_pool_long_sequence_carries_sums_across_blocks():
    torch.manual_seed(6)
    length = 3 * lsa_module.POOL_BLOCK + 16                   # a window of 208: four blocks
    logits, values = torch.randn(1, length, 3) * 5, torch.randn(1, length, 4)
    torch.testing.assert_close(prefix_softmax_pool(logits, values).double(),
                               naive_prefix_pool(logits, values), rtol=1e-5, atol=1e-5)


def test_prefix_softmax_pool_gradients_match_naive_across_blocks(monkeypatch):
    monkeypatch.setattr(lsa_module, "POOL_BLOCK", 4)
    torch.manual_seed(7)
    logits = (torch.randn(2, 11, 3) * 3).requires_grad_()
    values = torch.randn(2, 11, 5).requires_grad_()
    weights = torch.randn(2, 11, 3, 5, dtype=torch.float64)
    got = torch.autograd.grad((prefix_softmax_pool(logits, values).double() * weights).sum(),
                              (logits, values))
    want = torch.autograd.grad((naive_prefix_pool(logits, values) * weights).sum(),
                               (logits, values))                  # through float64
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_causal_low_rank_attention_step_equals_forward():
    torch.manual_seed(8)
    layer = CausalLowRankAttention(hidden=16, n_heads=4, n_interests=5, dropout=0.1,
                                   attn_dropout=0.1).eval()
    x = torch.randn(2, 40, 16)
    with torch.no_grad():
        full = layer(x)
        state = layer.allocate_inference_cache(2)
        stepped = torch.stack([layer.step(x[:, t], state) for t in range(40)], dim=1)
    torch.testing.assert_close(stepped, full, rtol=1e-5, atol=1e-5)


def test_causal_low_rank_attention_is_causal_and_paper_lsa_is_not():
    torch.manual_seed(9)
    kw = dict(hidden=16, n_heads=4, n_interests=5, dropout=0.0, attn_dropout=0.0)
    causal, paper = CausalLowRankAttention(**kw).eval(), LowRankAttention(**kw).eval()
    x = torch.randn(1, 10, 16)
    longer = torch.cat([x, torch.randn(1, 1, 16) * 3], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(causal(longer)[:, :10], causal(x), rtol=1e-6, atol=1e-6)
        assert (paper(longer)[:, :10] - paper(x)).abs().max() > 1e-4


def test_low_rank_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError):
        CausalLowRankAttention(hidden=10, n_heads=4, n_interests=2, dropout=0.0, attn_dropout=0.0)


def test_prefix_softmax_pool_running_sums_survive_huge_logit_spread():
    length = lsa_module.POOL_BLOCK + 1
    logits = torch.zeros(1, length, 1)
    logits[0, 0, 0] = -800.0                  # the first item is far below the later ones
    values = torch.arange(float(length)).view(1, length, 1)
    pooled = prefix_softmax_pool(logits, values)
    # position 0 pools only item 0 (softmax over one element), position 1 averages 0 and 1
    assert pooled[0, 0, 0, 0].item() == 0.0
    assert torch.isfinite(pooled).all()
