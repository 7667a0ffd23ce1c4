"""Seconds of one Muon step's Newton-Schulz over GPT-2 small's matrices: one matrix at a time in fp32, the same
stacked per layer kind in fp32, and one at a time in bf16 (docs/experiments/optimizer.md).

    .venv/bin/python scripts/bench_newton_schulz.py
"""

import time

import torch

from gpt2_dutch.train.muon import newton_schulz, orthogonal_update

torch.manual_seed(0)
L, h = 12, 768
shapes = [((h, 3 * h), 3), ((h, h), 1), ((h, 4 * h), 1), ((4 * h, h), 1)]
mats = {s: [torch.randn(*s) for _ in range(L)] for s, _ in shapes}
def old():
    for s, b in shapes:
        for m in mats[s]:
            orthogonal_update(m, True, b, torch.float32)
def batched(dtype):
    for s, b in shapes:  # the same layer of all 12 blocks as one batched iteration
        stack = torch.stack(mats[s]).mT
        n, rows, cols = stack.shape
        newton_schulz(stack.reshape(n * b, rows // b, cols), dtype=dtype)
def bf16():
    for s, b in shapes:
        for m in mats[s]:
            orthogonal_update(m, True, b, torch.bfloat16)
fns = {"per matrix fp32": old, "batched fp32": lambda: batched(torch.float32), "per matrix bf16": bf16}
times = {k: [] for k in fns}
for _ in range(3):  # alternating, so a busy moment of the machine costs every variant alike
    for k, f in fns.items():
        t = time.perf_counter()
        f()
        times[k].append(time.perf_counter() - t)
for k, v in times.items():
    print(f"{k}: median {sorted(v)[1]:.3f} s per small-model Muon step ({torch.get_num_threads()} threads)")
