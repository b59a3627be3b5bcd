"""Run in a fresh process by test_cost.py: an unroll's peak RSS next to CostModel's prediction (see DESIGN.md on
measuring CPU memory: run with MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0).

    python peak_rss_worker.py SCHEDULE N   ->  prints "measured predicted" in bytes
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


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
