"""MasterWeights (bf16 without ZeRO): the update of plain AdamW on fp32 copies with clipping,
a non-finite gradient skipped on the device, and a state that resumes exactly."""
import copy

import torch

from janus_pretrain.parallel.state import DeepSpeedMPU
from janus_pretrain.train.master_weights import MasterWeights

LR, CLIP = 1e-2, 0.5


def model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return net.to(torch.bfloat16)


def adamw(groups):
    return torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.98), eps=1e-6, fused=True)


def ours(net):
    groups = [{"params": [net[0].weight, net[2].weight], "weight_decay": 0.01},
              {"params": [net[0].bias, net[2].bias], "weight_decay": 0.0}]
    return MasterWeights(groups, adamw, LR, CLIP, DeepSpeedMPU())


def backward(net, scale=1.0, seed=0):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    (net(x).float().square().mean() * scale).backward()


def test_step_is_adamw_on_clipped_fp32_copies(single_process):
    net, ref = model(), model()
    opt = ours(net)
    masters = {n: p.detach().float().clone().requires_grad_() for n, p in ref.named_parameters()}
    wd = {n: 0.01 if n.endswith("weight") else 0.0 for n in masters}
    ref_opt = adamw([{"params": [masters[n] for n in masters if wd[n]], "weight_decay": 0.01},
                     {"params": [masters[n] for n in masters if not wd[n]], "weight_decay": 0.0}])
    for step in range(3):
        backward(net, seed=step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        backward(ref, seed=step)
        for n, p in ref.named_parameters():
            masters[n].grad = p.grad.float()
            p.grad = None
        norm = torch.nn.utils.clip_grad_norm_(list(masters.values()), CLIP)
        ref_opt.step()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(masters[n])
        torch.testing.assert_close(opt._global_grad_norm, norm, rtol=1e-6, atol=0)
    for (n, a), b in zip(net.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), n
    assert not torch.equal(net[0].weight, model()[0].weight)  # it trained


def test_nonfinite_gradient_skips_on_the_device(single_process):
    net = model()
    opt = ours(net)
    backward(net)
    opt.step()
    before = [p.clone() for p in net.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.zero_grad(set_to_none=True)
    backward(net, scale=float("inf"))
    opt.found_inf = torch.zeros(())
    opt.step()
    assert opt.found_inf.item() == 1.0  # raised for the caller to read
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    after = opt.state_dict()
    for a, b in zip(state["inner"]["state"].values(), after["inner"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("exp_avg", "exp_avg_sq", "step"))


def test_state_dict_resumes_exactly(single_process):
    net = model()
    opt = ours(net)
    for step in range(2):
        backward(net, seed=step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    saved = copy.deepcopy((net.state_dict(), opt.state_dict()))
    other = model()
    other.load_state_dict(saved[0])
    other_opt = ours(other)
    other_opt.load_state_dict(saved[1])
    for o, n in ((opt, net), (other_opt, other)):
        backward(n, seed=7)
        o.step()
    for a, b in zip(net.parameters(), other.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.masters, other_opt.masters):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
