"""How fast a frozen pretrained network embeds on this machine, by memory layout and arithmetic, and
how fast TEMI's heads train in float32 and bf16: the figures behind `clusterlab.nn.Pretrained`'s
channels_last and `clusterlab cluster --precision auto`.

    python benchmarks/embedding.py [--networks efficientnet_lite0 resnet50] [--batch 64] [--repeats 3]

Each network (random weights for torchvision's: the speed does not depend on them; the packaged
weights for efficientnet_lite0) embeds one batch of random 224 px images, best of `--repeats` after
a warm-up, in the same process: NCHW float32 (the plain network), channels_last float32 and
channels_last under bf16 autocast (what `Pretrained(precision="bf16")` runs). Printed: images/s,
the ratio to NCHW float32, and the features' agreement (largest absolute difference, lowest
cosine) with NCHW float32. Then one TEMI training step (4 heads, 1280 -> 512 -> 256 -> 10, batch
256, AdamW) in float32 and under bf16 autocast, ms per step.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import command_line, machine_line  # noqa: E402


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: oneDNN picks and compiles its kernels on the first call
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def network(name: str) -> torch.nn.Module:
    if name == "efficientnet_lite0":
        from clusterlab.nn import Pretrained

        return Pretrained(name, frozen=False).net.eval()  # frozen=False: the plain NCHW network
    net = torchvision.models.get_model(name).eval()
    return net


def embedding(name: str, batch: int, repeats: int) -> list[str]:
    torch.manual_seed(0)
    net, x = network(name), torch.rand(batch, 3, 224, 224)
    rows = []
    with torch.inference_mode():
        reference = net(x)
        base = best_seconds(lambda: net(x), repeats)
        rows.append((f"{name}, NCHW, float32", batch / base, 1.0, 0.0, 1.0))
        fast = copy.deepcopy(net).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        for label, bf16 in (("channels_last, float32", False), ("channels_last, bf16 autocast", True)):

            def run(fast=fast, bf16=bf16):
                with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
                    return fast(xc).float()

            seconds = best_seconds(run, repeats)
            out = run()
            cosine = torch.nn.functional.cosine_similarity(out, reference).min().item()
            diff = (out - reference).abs().max().item()
            rows.append((f"{name}, {label}", batch / seconds, base / seconds, diff, cosine))
    return [f"| {r[0]} | {r[1]:.1f} | {r[2]:.2f}x | {r[3]:.1e} | {r[4]:.4f} |" for r in rows]


def heads_step(repeats: int) -> list[str]:
    from clusterlab.nn.heads import ProjectionHeads

    torch.manual_seed(0)
    heads = ProjectionHeads(1280, 10, 4, 512, 256)
    teacher = copy.deepcopy(heads).requires_grad_(False)
    optimizer = torch.optim.AdamW(heads.parameters(), 1e-3)
    f, g = torch.randn(256, 1280), torch.randn(256, 1280)

    def step(bf16: bool) -> None:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                t, t_neighbor = teacher(f), teacher(g)
            s, s_neighbor = heads(f), heads(g)
            loss = -(t.float().softmax(-1) * s_neighbor.float().log_softmax(-1)).sum()
            loss = loss - (t_neighbor.float().softmax(-1) * s.float().log_softmax(-1)).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    rows = []
    base = None
    for label, bf16 in (("float32", False), ("bf16 autocast", True)):
        seconds = best_seconds(lambda bf16=bf16: [step(bf16) for _ in range(10)], repeats) / 10
        base = base or seconds
        rows.append(f"| TEMI heads step, {label} | {seconds * 1000:.1f} ms | {base / seconds:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["efficientnet_lite0", "resnet50"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from clusterlab import env

    _, flags = env.cpu_info()
    bf16_flags = [f for f in env.BF16_CPU_FLAGS if flags and f in flags]
    print(machine_line(f"{torch.get_num_threads()} threads", f"bf16 CPU flags: {bf16_flags}"))
    print(f"Command: {command_line()}\n")
    print("| network, layout, arithmetic | images/s | ratio | max abs diff | min cosine |")
    print("|---|---|---|---|---|")
    for name in args.networks:
        print("\n".join(embedding(name, args.batch, args.repeats)), flush=True)
    print("\n| step | time | ratio |\n|---|---|---|")
    print("\n".join(heads_step(args.repeats)))


if __name__ == "__main__":
    main()
