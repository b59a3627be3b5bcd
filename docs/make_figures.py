"""Regenerate the README's explain excerpt and step-graph drawing: python docs/make_figures.py"""

import torch
from torch import nn

import unrollc
from unrollc.inspect import draw

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def loss_fn(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


stepper = unrollc.compile(model, opt, loss_fn)
batch = (torch.randn(16, 4), torch.randn(16, 2))
state = stepper.step(stepper.step(stepper.init(), batch), batch)
print(unrollc.explain(stepper))
draw(stepper, "docs/step.png", collapse=True)
print("wrote docs/step.png")
