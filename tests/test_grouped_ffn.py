"""The grouped expert op against plain autograd over per-expert `F.linear` calls (the reference it replaces)."""

import pytest
import torch
import torch.nn.functional as F

from moe_model.grouped_ffn import grouped_expert_ffn


def reference(x_RD, w_in, w_down, counts, act_fn, gated):
    out = []
    for e, x_ND in enumerate(x_RD.split(counts)):
        h = F.linear(x_ND, w_in[e])
        if gated:
            gate, up = h.chunk(2, dim=-1)
            a = act_fn(gate) * up
        else:
            a = act_fn(h)
        out.append(F.linear(a, w_down[e]))
    return torch.cat(out)


@pytest.mark.parametrize("gated", [True, False])
def test_forward_and_every_gradient_equal_per_expert_autograd(gated):
    torch.manual_seed(0)
    E, D, I = 5, 6, 4
    counts = [3, 0, 7, 1, 0]  # experts without rows must get zero weight gradients
    activation, act_fn = ("silu", F.silu) if gated else ("gelu", F.gelu)
    x = torch.randn(sum(counts), D, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(E, 2 * I if gated else I, D, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(E, D, I, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(sum(counts), D, dtype=torch.float64)

    ours = grouped_expert_ffn(x, w_in, w_down, counts, activation, gated)
    ours_grads = torch.autograd.grad(ours, (x, w_in, w_down), grad_y)
    ref = reference(x, w_in, w_down, counts, act_fn, gated)
    ref_grads = torch.autograd.grad(ref, (x, w_in, w_down), grad_y)

    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    for name, got, want in zip(("x", "w_in", "w_down"), ours_grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"gradient of {name}")
    assert ours_grads[1][1].abs().sum() == 0 and ours_grads[2][4].abs().sum() == 0


def test_gradcheck_gated():
    torch.manual_seed(1)
    counts = [2, 1, 0, 3]
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(4, 4, 3, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: grouped_expert_ffn(a, b, c, counts, "silu", True), (x, w_in, w_down))


def test_counts_that_do_not_match_the_rows_are_refused():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="counts"):
        grouped_expert_ffn(x, torch.randn(2, 4, 3), torch.randn(2, 3, 2), [1, 2], "silu", True)


def test_per_expert_weight_tensors_give_the_stacked_result_and_gradients():
    """DeepSpeed keeps one module per expert: the op takes their weights as lists, with per-expert gradients."""
    torch.manual_seed(2)
    counts = [4, 0, 3]
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w_in = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    in_list = [w.detach().clone().requires_grad_() for w in w_in]
    down_list = [w.detach().clone().requires_grad_() for w in w_down]
    grad_y = torch.randn(7, 5, dtype=torch.float64)

    stacked = grouped_expert_ffn(x, w_in, w_down, counts, "silu", True)
    stacked_grads = torch.autograd.grad(stacked, (w_in, w_down), grad_y)
    listed = grouped_expert_ffn(x, in_list, down_list, counts, "silu", True)
    listed_grads = torch.autograd.grad(listed, (*in_list, *down_list), grad_y)

    torch.testing.assert_close(listed, stacked, rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(listed_grads[:3]), stacked_grads[0], rtol=0, atol=0)
    torch.testing.assert_close(torch.stack(listed_grads[3:]), stacked_grads[1], rtol=0, atol=0)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="activation"):
        grouped_expert_ffn(torch.randn(3, 3), torch.randn(1, 4, 3), torch.randn(1, 3, 2), [3], "relu", True)


# --- torch._grouped_mm (the accelerator's kernel) against the loop --------------------------------------------------
# torch 2.13's CPU build runs torch._grouped_mm (aten's per-group mm loop, the same semantics as the CUDA kernel:
# int32 end offsets, rows past the last offset unwritten), so the CPU stands in for the accelerator here; the CUDA
# kernel itself is left to scripts/gpu_check.py.

GROUPED_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _ffn_case(dtype, gated, seed=3):
    """Tiny operands (widths multiples of 8: the kernel's 16-byte rows in bf16), an expert without rows and two
    dropped rows at the end (counts of length E + 1)."""
    torch.manual_seed(seed)
    E, D, I = 4, 8, 8
    counts = [3, 0, 4, 2, 2]  # expert 1 empty; the last entry: dropped rows
    R = sum(counts)
    x = torch.randn(R, D, dtype=dtype, requires_grad=True)
    w_in = (torch.randn(E, 2 * I if gated else I, D, dtype=dtype) / 3).requires_grad_()
    w_down = (torch.randn(E, D, I, dtype=dtype) / 3).requires_grad_()
    return x, w_in, w_down, counts, torch.randn(R, D, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gated", [True, False], ids=["silu-gated", "gelu"])
def test_grouped_mm_kernel_gives_the_loops_output_and_gradients(dtype, gated):
    x, w_in, w_down, counts, grad_y = _ffn_case(dtype, gated)
    activation = "silu" if gated else "gelu"
    results = {}
    for name, c in (("loop", counts), ("grouped_mm", torch.tensor(counts))):
        y = grouped_expert_ffn(x, w_in, w_down, c, activation, gated)
        results[name] = (y, *torch.autograd.grad(y, (x, w_in, w_down), grad_y))
    routed = sum(counts[:-1])
    for label, got, want in zip(("output", "grad x", "grad w_in", "grad w_down"), results["grouped_mm"],
                                results["loop"]):
        torch.testing.assert_close(got, want, **GROUPED_TOL[dtype], msg=label)
    y, grad_x, grad_w_in, grad_w_down = results["grouped_mm"]
    assert not y[routed:].any() and not grad_x[routed:].any(), "dropped rows: zero output, no gradient"
    assert not grad_w_in[1].any() and not grad_w_down[1].any(), "an expert without rows gets zero gradients"
    assert y[:routed].abs().min() > 0 and grad_w_in[0].abs().sum() > 0  # not vacuous


def _block(capacity_factor, hidden_act="silu"):
    from moe_model import MoEConfig
    from moe_model.modeling import MoESparseBlock

    cfg = MoEConfig(vocab_size=64, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=4, num_local_experts=4, num_experts_per_tok=2,
                    hidden_act=hidden_act, capacity_factor=capacity_factor, router_z_loss_coef=1e-3)
    return MoESparseBlock(cfg)


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_block_on_the_grouped_kernel_keeps_the_blocks_contract(capacity_factor):
    """Outputs, aux and z losses, expert counts and every gradient of the model's MoE block (ep 1) are the loop's
    when the block runs on torch._grouped_mm (forced, fp32), with dropped routes (capacity 1.0 over a skewed
    router) and without."""
    from moe_model.grouped_ffn import force_backend

    torch.manual_seed(4)
    block = _block(capacity_factor)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    with torch.no_grad():
        block.gate.weight[0] += 1.0  # skew the router towards expert 0 so that a capacity drops routes
    x = torch.randn(2, 6, 8, requires_grad=True)
    runs = {}
    for backend in ("loop", "grouped_mm"):
        with force_backend(backend):
            y, router = block(x)
            loss = y.square().sum() + router.aux_loss + router.z_loss
            grads = torch.autograd.grad(loss, (x, *block.parameters()))
        runs[backend] = (y, router, grads)
    (y0, r0, g0), (y1, r1, g1) = runs["loop"], runs["grouped_mm"]
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r1.aux_loss, r0.aux_loss, rtol=0, atol=0)
    torch.testing.assert_close(r1.z_loss, r0.z_loss, rtol=0, atol=0)
    assert r1.expert_counts_E.tolist() == r0.expert_counts_E.tolist()
    names = ["x"] + [n for n, _ in block.named_parameters()]
    for name, a, b in zip(names, g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"gradient of {name}")
    if capacity_factor is not None:  # the case must drop routes, or the tail rows went untested
        from moe_model.routing import expert_capacity

        capacity = expert_capacity(12, 4, 2, capacity_factor, block.config.min_capacity)
        assert r0.expert_counts_E.max() > capacity


@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_grouped_kernel_path_reads_nothing_back_to_the_host(capacity_factor):
    """The block's forward and backward on the meta device: tensors without data, where any host read (`.tolist()`,
    `.item()`, `bool()`, `.cpu()`, a data-dependent shape such as bincount's) raises. The grouped_mm path runs
    through; the loop path (its one `.tolist()` of the counts) must fail the same way, or the check proves nothing."""
    from moe_model.grouped_ffn import force_backend

    with torch.device("meta"):
        block = _block(capacity_factor).to(torch.bfloat16)  # the meta kernel of _grouped_mm is bf16-only
        x = torch.empty(2, 6, 8, dtype=torch.bfloat16, requires_grad=True)
    with force_backend("grouped_mm"):
        y, router = block(x)
        (y.float().sum() + router.aux_loss + router.z_loss).backward()
    assert x.grad.shape == x.shape and block.experts.gate_up_proj.grad.shape == block.experts.gate_up_proj.shape
    with force_backend("loop"), pytest.raises(NotImplementedError, match="meta"):
        block(x)


def test_kernel_rule():
    """`grouped_mm_refusal`: the fused kernel only where torch runs it without a host sync; CPU tensors take the loop."""
    from moe_model.grouped_ffn import force_backend, grouped_backend, grouped_mm_refusal

    bf16, fp32 = torch.bfloat16, torch.float32
    ok = dict(device_type="cuda", capability=(9, 0), dtypes=(bf16, bf16, bf16), widths=(2048, 1024, 1024, 1024),
              num_experts=64, stacked=True, aligned=True)
    assert grouped_mm_refusal(**ok) is None
    assert grouped_mm_refusal(**{**ok, "capability": (10, 0)}) is None
    refused = {"cpu": dict(device_type="cpu", capability=None), "fp32": dict(dtypes=(fp32, fp32, fp32)),
               "mixed": dict(dtypes=(fp32, bf16, bf16)), "sm80": dict(capability=(8, 0)),
               "sm120": dict(capability=(12, 0)), "1024 experts": dict(num_experts=1024),
               "width 1020": dict(widths=(2040, 1020, 1020, 1020)), "per-expert tensors": dict(stacked=False),
               "unaligned": dict(aligned=False)}
    for label, change in refused.items():
        assert grouped_mm_refusal(**{**ok, **change}), label
    x, w_in, w_down, *_ = _ffn_case(torch.bfloat16, True)
    assert grouped_backend(x, w_in, w_down) == "loop"
    with force_backend("grouped_mm"):
        assert grouped_backend(x, w_in, w_down) == "grouped_mm"
    assert grouped_backend(x, w_in, w_down) == "loop"
    with pytest.raises(ValueError, match="backend"), force_backend("cutlass"):
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check's machines)")
def test_cuda_grouped_kernel_equals_the_loop_and_never_syncs():
    """On the accelerator itself: the rule picks torch._grouped_mm for a bf16 block on sm90/sm100; the kernel's
    output and gradients are the loop's (bf16 rounding; an empty expert's weight gradients exactly zero, dropped rows
    zero); and the block's forward and backward run under `torch.cuda.set_sync_debug_mode("error")`, which raises on
    any device-to-host synchronisation, while the loop path trips it (its one read of the counts)."""
    from moe_model.grouped_ffn import force_backend, grouped_backend

    dev = torch.device("cuda")
    torch.manual_seed(5)
    E, D, I, R, dropped = 8, 256, 512, 4096, 96
    counts = [700, 513, 600, 0, 451, 650, 397]  # uneven, expert 3 empty
    counts_e1 = torch.tensor([*counts, R - dropped - sum(counts), dropped])
    x = torch.randn(R, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w_in = (torch.randn(E, 2 * I, D, device=dev, dtype=torch.bfloat16) / 16).requires_grad_()
    w_down = (torch.randn(E, D, I, device=dev, dtype=torch.bfloat16) / 16).requires_grad_()
    grad_y = torch.randn(R, D, device=dev, dtype=torch.bfloat16)
    if torch.cuda.get_device_capability()[0] in (9, 10):
        assert grouped_backend(x, w_in, w_down) == "grouped_mm"
    results = {}
    for name, c in (("loop", counts_e1.tolist()), ("grouped_mm", counts_e1.to(dev))):
        y = grouped_expert_ffn(x, w_in, w_down, c, "silu", True)
        results[name] = (y, *torch.autograd.grad(y, (x, w_in, w_down), grad_y))
    for label, got, want in zip(("output", "grad x", "grad w_in", "grad w_down"), results["grouped_mm"],
                                results["loop"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2, msg=label)
    y, grad_x, grad_w_in, grad_w_down = results["grouped_mm"]
    assert not y[R - dropped:].any() and not grad_x[R - dropped:].any()
    assert not grad_w_in[3].any() and not grad_w_down[3].any()

    block = _block(1.0).to(dev, torch.bfloat16)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.5)
    xb = torch.randn(4, 64, 8, device=dev, dtype=torch.bfloat16, requires_grad=True)
    for backend in ("grouped_mm", "loop"):  # warm-up: first calls may sync while loading kernels
        with force_backend(backend):
            block(xb)[0].float().sum().backward()
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        with force_backend("grouped_mm"):
            y, router = block(xb)
            (y.float().square().sum() + router.aux_loss + router.z_loss).backward()
        with force_backend("loop"), pytest.raises(RuntimeError, match="synchroniz"):
            block(xb)
    finally:
        torch.cuda.set_sync_debug_mode("default")
