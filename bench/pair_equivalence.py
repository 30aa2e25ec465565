"""The fast pair step gives the loss of a straightforward one on the same batch.

    python bench/pair_equivalence.py [--archs resnet18 ...] [--size 32] [--batch 16] [--device cpu|cuda]

Fast: the training's own path (policy -> batched exact MCKP -> ``DynamicQuant``: every layer's
input quantized for the whole batch at once, weights swapped in by ``functional_call``; the
one-pixel convolutions folded by ``Runtime.to_device``).
Straightforward: the network as timm builds it and, per example, a per-layer Python loop DP for
the knapsack, the model's weights overwritten with ``torch.fake_quantize_per_tensor_affine`` and
each layer's input quantized by the same torch op through forward hooks, one example at a time. Prints both losses (α·KD + β·hinge,
robust and detrimental) and their difference; on CUDA the fast path runs under bf16 autocast, as
the training does, so the difference there is bf16's, not a different result.
"""
import argparse
import copy

import timm
import torch

from _timing import bench_runtime
from dptq import budgets, losses
from dptq.policy import BitPolicy, allocate
from dptq.quant import DynamicQuant, quantizable_layers


def loop_mckp(profits, options, capacity):
    """Per example, per layer, per option: the textbook DP, returning the chosen bits [N]."""
    n, k = profits.shape
    best = {0: (0.0, [])}  # total bits -> (profit, choices)
    for layer in range(n):
        nxt = {}
        for total, (value, picks) in best.items():
            for j in range(k):
                cand = (value + float(profits[layer, j]), picks + [options[j]])
                key = total + options[j]
                # ties go to the larger option of this layer, as dptq.mckp does
                if key not in nxt or cand[0] > nxt[key][0] or (cand[0] == nxt[key][0] and options[j] > nxt[key][1][-1]):
                    nxt[key] = cand
        best = nxt
    return torch.tensor(best[capacity][1], dtype=torch.float32)


def straightforward_logits(model, x, bits, weight_bits=16):
    """Quantized logits one example at a time with torch's own fake-quant op."""
    model = copy.deepcopy(model).float()
    qmax = 2 ** (weight_bits - 1) - 1
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                scale = max(m.weight.abs().max().item() / qmax, 1e-8)
                m.weight.copy_(torch.fake_quantize_per_tensor_affine(m.weight, scale, 0, -qmax, qmax))
    layers = quantizable_layers(model, x.shape[-1])
    outs = []
    for i in range(x.shape[0]):
        def hook(index):
            def quantize(_m, args):
                a = args[0].float()
                lo, hi = min(a.min().item(), 0.0), max(a.max().item(), 0.0)
                levels = 2 ** int(bits[i, index]) - 1
                scale = max((hi - lo) / levels, 1e-8)
                zero = int(round(-lo / scale))
                return (torch.fake_quantize_per_tensor_affine(a, scale, zero, 0, levels),)
            return quantize
        handles = [layer.register_forward_pre_hook(hook(j)) for j, layer in enumerate(layers)]
        with torch.no_grad():
            outs.append(model(x[i:i + 1].float()))
        for h in handles:
            h.remove()
    return torch.cat(outs)


def compare(arch, size, batch, device):
    rt = bench_runtime(device)
    torch.manual_seed(0)
    plain = timm.create_model(arch, num_classes=10).eval()  # the straightforward path: no folded convolutions
    student = rt.to_device(copy.deepcopy(plain), size).eval()
    teacher = copy.deepcopy(student)
    quant = DynamicQuant(student, image_size=size)
    options = budgets.options(4, 10)
    capacity = budgets.capacity(quant.num_layers, 5.5, 1)
    policy = BitPolicy(quant.num_layers, len(options), 64, 32).to(device).eval()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=rt.memory_format)
    amp = rt.autocast()
    with torch.no_grad():
        targets = teacher(x).float()
        with amp:
            bits = allocate(policy, x, options, capacity)
            fp, q = student(x), quant(x, bits)
        profits = policy(x).float().cpu()
    slow_bits = torch.stack([loop_mckp(profits[i], options, capacity) for i in range(batch)])
    same_bits = torch.equal(slow_bits, bits.float().cpu())
    q_slow = straightforward_logits(plain, x.cpu(), slow_bits)
    fp_slow = plain(x.cpu().float()).detach()
    rows = []
    for mode in ("robust", "detrimental"):
        fast = (losses.kd_loss(fp.float().cpu(), targets.cpu(), 5.0) + losses.hinge_loss(q.float().cpu(), targets.cpu(), 0.1, mode)).item()
        slow = (losses.kd_loss(fp_slow, targets.cpu(), 5.0) + losses.hinge_loss(q_slow, targets.cpu(), 0.1, mode)).item()
        rows.append((mode, fast, slow))
    max_logit_gap = (q.float().cpu() - q_slow).abs().max().item()
    return same_bits, max_logit_gap, rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=["resnet18", "mobilenetv4_conv_medium", "regnetx_016"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device={device} size={args.size} batch={args.batch}")
    print(f"{'arch':<26}{'same bits':>10}{'max |dlogit|':>14}{'mode':>13}{'fast loss':>12}{'straight loss':>15}{'diff':>10}")
    for arch in args.archs:
        same, gap, rows = compare(arch, args.size, args.batch, device)
        for mode, fast, slow in rows:
            print(f"{arch:<26}{str(same):>10}{gap:>14.2e}{mode:>13}{fast:>12.6f}{slow:>15.6f}{fast - slow:>10.1e}")


if __name__ == "__main__":
    main()
