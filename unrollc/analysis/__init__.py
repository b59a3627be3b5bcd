"""Analyses of step graphs: memory (bytes carried and saved for backward) and cost models.

``CostModel.from_stepper(stepper, state, batch)`` is the cost model of one step (also ``unrollc.CostModel``);
``predict(policy, n)`` and ``expressions(policy)`` give a checkpoint schedule's evaluations, stored states and
peak bytes, as numbers or as sympy expressions in ``n``.
"""

from .cost import CostExprs, CostModel, Prediction

__all__ = ["CostExprs", "CostModel", "Prediction"]
