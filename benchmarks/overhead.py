"""What does pfl's machinery cost? The same pFedLoRA rounds, run by pfl's loop and by a plain PyTorch loop.

Both sides, in one process, interleaved round by round so machine noise hits them alike:
- the same clients (the recipe's partition), the same initial private models and adapter,
- the same mini-batches (TensorBatches with the same seeds) and on-device transform,
- the same two phases (local: model trains on CE(z, y), adapter frozen; adapter: model frozen under
  no_grad, adapter trains), SGD with momentum, weight decay, gradient-norm clip,
- the same bookkeeping a federated round needs: load each client's state, train, copy state and upload
  back to the CPU, weighted-mean the adapters.
pfl adds Lightning (its Fabric loop calling the module's hooks), the store, sampling, byte counting and callbacks.

    python benchmarks/overhead.py                       # fmnist recipe, 5 timed rounds
    python benchmarks/overhead.py --recipe fmnist-xdevice --rounds 10 --threads 1   # cross-device: 50 small clients
    python benchmarks/overhead.py --recipe smoke --rounds 2
    python benchmarks/overhead.py --memory              # peak RSS of each side, each alone in a subprocess
    python benchmarks/overhead.py --accelerator gpu --resident on --precision bf16-mixed   # on a GPU

Prints per-round seconds for both, the ratio of the medians, and the median of the per-round (paired)
ratios pfl / plain, which is the figure least moved by a noisy machine (targets: <= 1.10 on fmnist, the
paper's shape; <= 1.15 on fmnist-xdevice, where per-client fixed costs dominate). Peak memory
cannot be told apart within one process, so `--memory` runs each side alone (`--side`) in a fresh
subprocess for the same rounds and compares their peak resident set sizes.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from pfl import config
from pfl.algorithms.base import cpu_clone
from pfl.build import build
from pfl.data import TensorBatches
from pfl.federation import FederatedRun, MemoryStore, make_runner
from pfl.federation.engine import sample_clients
from pfl.seeding import derive_seed


def plain_round(cfg, setup, states: dict, global_adapter: dict, round_idx: int, models: dict,
                device: torch.device = torch.device("cpu")) -> dict:
    """One pFedLoRA round written directly in PyTorch, float32 on `device` (states stay on the CPU, each batch
    is moved when it is used): the reference."""
    uploads, sizes = [], []
    for k in sample_clients(cfg.num_clients, cfg.participation, cfg.seed, round_idx):
        module = models[setup.architectures[k]]
        module.load_private_state(states[k])
        module.receive(global_adapter)
        data = setup.clients[k]
        seed = derive_seed(cfg.seed, "fit", round_idx, k)
        for phase, params, epochs in (("local", list(module.model.parameters()), cfg.local_epochs),
                                      ("adapter", list(module.adapter.parameters()), cfg["pfedlora.adapter_epochs"])):
            for p in module.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            module.train()
            if phase == "adapter":
                module.model.eval()
            torch.manual_seed(derive_seed(seed, phase, "augment"))
            batches = TensorBatches(data.x_train, data.y_train, cfg.batch_size, True, derive_seed(seed, phase, "order"))
            for _ in range(epochs):
                for x, y in batches:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    x = setup.algorithm.spec.transform(x, train=True)
                    if phase == "local":
                        h = module.model.phi(x)
                        loss = F.cross_entropy(module.model.head(h) + module.adapter(h), y)
                    else:
                        with torch.no_grad():
                            h = module.model.phi(x)
                            logits = module.model.head(h)
                        loss = F.cross_entropy(logits + module.adapter(h), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    opt.step()
        states[k] = module.private_state()
        uploads.append(cpu_clone({"adapter.A": module.adapter.A, "adapter.B": module.adapter.B}))
        sizes.append(data.num_train)
    total = sum(sizes)
    return {name: sum(u[name] * (n / total) for u, n in zip(uploads, sizes)) for name in uploads[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fmnist")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override key=value")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds per side first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--side", choices=("both", "pfl", "plain"), default="both",
                        help="run only one side (used by --memory)")
    parser.add_argument("--memory", action="store_true", help="compare peak RSS, each side in a subprocess")
    parser.add_argument("--accelerator", choices=("cpu", "gpu"), default="cpu", help="where both sides train")
    parser.add_argument("--precision", default="32-true", help="pfl's Lightning precision (the plain side: float32)")
    parser.add_argument("--resident", choices=("on", "off"), default="off",
                        help="pfl keeps client data and states on the device (the plain side never does)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        compare_memory(args)
        return

    total_rounds = args.warmup + args.rounds
    cfg, _ = config.load(args.recipe, args.overrides + [f"rounds={total_rounds}", f"eval_every={10**6}"])
    setup = build(cfg)
    runner = make_runner(args.accelerator, 1, args.precision, cfg.grad_clip)
    device = runner.device
    resident = args.resident == "on"
    clients = [c.to(device) for c in setup.clients] if resident else setup.clients
    run = FederatedRun.local(cfg, clients, setup.architectures, setup.algorithm,
                             MemoryStore(device if resident else "cpu"), runner)
    run.initialise()
    plain_states = {k: cpu_clone(run.workers.store.get(k)) for k in range(cfg.num_clients)}
    plain_global = cpu_clone(run.state.global_state)
    plain_models = {} if args.side == "pfl" else {arch: setup.algorithm.make_client(arch).to(device)
                                                  for arch in set(setup.architectures)}

    if args.side != "both":
        for r in range(1, total_rounds + 1):
            if args.side == "plain":
                plain_global = plain_round(cfg, setup, plain_states, plain_global, r, plain_models, device)
            else:
                run.run_round()
        print(f"peak_rss_mib {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}")
        return

    def timed_plain(r: int, global_adapter: dict) -> tuple[float, dict]:
        started = time.perf_counter()
        new_global = plain_round(cfg, setup, plain_states, global_adapter, r, plain_models, device)
        return time.perf_counter() - started, new_global

    def timed_pfl(r: int) -> float:
        started = time.perf_counter()
        record = run.run_round()
        # the last round also evaluates every client; count training only, like the plain side
        return record["train_seconds"] if r == total_rounds else time.perf_counter() - started

    pfl_times, plain_times, ratios = [], [], []
    for r in range(1, total_rounds + 1):
        # alternate who goes first, so drifts in machine speed do not favour one side
        if r % 2:
            (plain_s, plain_global), pfl_s = timed_plain(r, plain_global), timed_pfl(r)
        else:
            pfl_s, (plain_s, plain_global) = timed_pfl(r), timed_plain(r, plain_global)
        tag = "warm-up" if r <= args.warmup else "timed"
        print(f"round {r} ({tag}): pfl {pfl_s:.3f} s, plain {plain_s:.3f} s, ratio {pfl_s / plain_s:.3f}", flush=True)
        if r > args.warmup:
            pfl_times.append(pfl_s)
            plain_times.append(plain_s)
            ratios.append(pfl_s / plain_s)

    drift = max((run.state.global_state[n].cpu().float() - plain_global[n].cpu()).abs().max().item()
                for n in plain_global)
    pfl_med, plain_med = statistics.median(pfl_times), statistics.median(plain_times)
    per_round = len(sample_clients(cfg.num_clients, cfg.participation, cfg.seed, 1))
    print(f"\nrecipe {args.recipe}: {cfg.num_clients} clients x K={per_round} "
          f"per round, {torch.get_num_threads()} torch threads; {device}, pfl at {args.precision}, "
          f"resident {args.resident}")
    print(f"median seconds per round: pfl {pfl_med:.3f}, plain PyTorch {plain_med:.3f}")
    print(f"ratio of medians pfl / plain: {pfl_med / plain_med:.3f}")
    print(f"median of per-round ratios: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, "
          f"max {max(ratios):.3f}; target <= 1.10 on the paper's setting, <= 1.15 cross-device)")
    print(f"max |global adapter pfl - plain| after {total_rounds} rounds: {drift:.2e}")


def compare_memory(args) -> None:
    peaks = {}
    for side in ("plain", "pfl"):
        cmd = [sys.executable, __file__, "--recipe", args.recipe, "--rounds", str(args.rounds), "--warmup", "0",
               "--side", side] + [f"--set={o}" for o in args.overrides]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--accelerator", args.accelerator, "--precision", args.precision, "--resident", args.resident]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or "peak_rss_mib" not in proc.stdout:
            sys.exit(f"--side {side} failed:\n{proc.stderr[-2000:]}")
        out = proc.stdout
        peaks[side] = float(out.split("peak_rss_mib")[1].split()[0])
        print(f"{side}: peak RSS {peaks[side]:.1f} MiB ({args.rounds} rounds of {args.recipe}, alone in a process)")
    print(f"ratio pfl / plain peak RSS: {peaks['pfl'] / peaks['plain']:.3f}")


if __name__ == "__main__":
    main()
