"""Run in a fresh process by test_cost.py: an unroll's peak RSS next to CostModel's prediction (see DESIGN.md on
measuring CPU memory: run with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0).

    python peak_rss_worker.py SCHEDULE N   ->  prints "measured predicted" in bytes

``SCHEDULE`` prefixed with ``heavy:`` runs a workload whose carried state outweighs its activations (MLP
256-256-256-4 in float64, batch 8, the initial weights requiring grad after two warm steps, no learned lr); with
``cnn:`` a small CNN with BatchNorm, whose step's backward needs about 1.5 times what the step saves.
"""

import sys

import torch

import unrollc


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def main(schedule: str, n: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if schedule.startswith("heavy:"):
        return heavy(schedule.removeprefix("heavy:"), n)
    if schedule.startswith("cnn:"):
        return cnn(schedule.removeprefix("cnn:"), n)
    checkpoint = {"binomial2": unrollc.Binomial(slots=2), "binomial4": unrollc.Binomial(slots=4), "every4": 4,
                  "sqrt": "sqrt"}.get(schedule)
    if schedule.startswith("budget"):
        checkpoint = unrollc.Budget(int(schedule[len("budget"):]))
    model = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                              lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]))
    batches = [(torch.randn(256, 128), torch.randint(0, 10, (256,))) for _ in range(n)]
    lr = torch.tensor(0.1, requires_grad=True)

    def run(steps: list) -> None:
        state = stepper.unroll(stepper.init(hyper={"lr": lr}), steps, checkpoint=checkpoint)
        stepper.forward(state, batches[0][0]).pow(2).mean().backward()

    run(batches[:3])  # warm-up: traces the graphs, touches every code path once
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    base = vm_hwm()
    run(batches)
    cost = unrollc.CostModel.from_stepper(stepper, stepper.init(hyper={"lr": lr}), batches[0])
    print(vm_hwm() - base, cost.predict(checkpoint, n).peak_bytes)


def heavy(schedule: str, n: int) -> None:
    torch.set_default_dtype(torch.float64)
    checkpoint = {"binomial2": unrollc.Binomial(slots=2), "every5": 5, "sqrt": "sqrt"}[schedule]
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 4))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                              lambda m, b: (m(b[0]) - b[1]).pow(2).mean())
    batches = [(torch.randn(8, 256), torch.randn(8, 4)) for _ in range(n)]
    with torch.no_grad():
        state = stepper.step(stepper.step(stepper.init(), batches[0]), batches[0])
    state = state.replace(params={k: v.detach().requires_grad_() for k, v in state.params.items()})

    def run(steps: list) -> None:
        final = stepper.unroll(state, steps, checkpoint=checkpoint)
        stepper.forward(final, batches[0][0]).sum().backward()

    run(batches[:3])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = vm_hwm()
    run(batches)
    print(vm_hwm() - base, unrollc.CostModel.from_stepper(stepper, state, batches[0]).predict(checkpoint, n).peak_bytes)


def cnn(schedule: str, n: int) -> None:
    checkpoint = {"binomial2": unrollc.Binomial(slots=2), "every4": 4}[schedule]
    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    stepper = unrollc.compile(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                              lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]))
    batches = [(torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))) for _ in range(n)]
    lr = torch.tensor(0.05, requires_grad=True)

    def run(steps: list) -> None:
        state = stepper.unroll(stepper.init(hyper={"lr": lr}), steps, checkpoint=checkpoint)
        stepper.forward(state, batches[0][0]).pow(2).mean().backward()

    run(batches[:3])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = vm_hwm()
    run(batches)
    print(vm_hwm() - base, unrollc.CostModel.from_stepper(stepper, stepper.init(hyper={"lr": lr}), batches[0])
          .predict(checkpoint, n).peak_bytes)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
