"""Adafactor that also takes row-sparse gradients (an embedding table with `sparse=True`).

A hashed n-gram table (`student.nlu.TokenNgrams`, 32k x 128) sees ~1,500 of its rows in a batch, yet a
dense gradient makes every step pay for all of them: on one CPU thread the dense embedding backward
costs ~15 ms and the Adafactor update ~24 ms, more than the encoder itself. Adafactor without
momentum (beta1=None, as T5 and this project use it) leaves a row with zero gradient unchanged apart
from weight decay, so the update restricted to the touched rows is the dense update: the factored
second moments, the update's RMS clipping and the parameter-RMS scaling below are computed over the
whole matrix exactly as transformers' `Adafactor.step` computes them, from the touched rows alone.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.optimization import Adafactor


class RowSparseAdafactor(Adafactor):
    """transformers' Adafactor for dense gradients; sparse COO gradients of 2-D parameters (rows x
    columns, as `nn.Embedding(sparse=True)` produces) get the same update computed on their rows.

    max_grad_norm > 0 clips the global gradient norm first, as `torch.nn.utils.clip_grad_norm_`. Use
    it instead of DeepSpeed's `gradient_clipping` when a gradient is sparse: DeepSpeed scales each
    gradient with `p.grad.data.mul_(coef)`, which leaves a sparse gradient unscaled.
    """

    def __init__(self, params: Any, max_grad_norm: float = 0.0, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()  # duplicate rows (several n-grams, micro-batches) summed once
        if self.max_grad_norm > 0:
            self._clip(params)
        sparse = [p for p in params if p.grad.is_sparse]
        if not sparse:
            return super().step(closure)
        grads = {p: p.grad for p in sparse}
        for p in sparse:
            p.grad = None  # the dense step skips parameters without a gradient
        try:
            loss = super().step(closure)
        finally:
            for p, grad in grads.items():
                p.grad = grad
        for group in self.param_groups:
            for p in group["params"]:
                if p in grads:
                    self._sparse_step(p, grads[p], group)
        return loss

    def _clip(self, params: list[torch.Tensor]) -> None:
        norms = [(p.grad.values() if p.grad.is_sparse else p.grad).float().norm(2) for p in params]
        if not norms:
            return
        total = torch.stack(norms).pow(2).sum().sqrt()
        coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
        for p in params:
            if p.grad.is_sparse:
                p.grad.values().mul_(coef.to(p.grad.dtype))
            else:
                p.grad.mul_(coef.to(p.grad.dtype))

    def _sparse_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> None:
        if grad.dim() != 2 or p.dtype != torch.float32:
            raise RuntimeError(f"RowSparseAdafactor: sparse gradients only for 2-D fp32 parameters, got {tuple(grad.shape)} {p.dtype}")
        if group["beta1"] is not None:
            raise RuntimeError("RowSparseAdafactor: sparse gradients need beta1=None (momentum would move every row)")
        rows, values = grad.indices()[0], grad.values().float()  # [n], [n, C]: each touched row once
        num_rows, num_cols = grad.shape
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            state["exp_avg_sq_row"] = torch.zeros(num_rows, dtype=values.dtype)
            state["exp_avg_sq_col"] = torch.zeros(num_cols, dtype=values.dtype)
            state["RMS"] = 0
        state["step"] += 1
        state["RMS"] = self._rms(p)
        lr = self._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        eps = group["eps"][0]

        # The dense step's (grad**2 + eps) is eps on every untouched row.
        squared = values.pow(2) + eps  # [n, C]
        row_mean = torch.full((num_rows,), eps, dtype=values.dtype)
        row_mean[rows] = squared.mean(dim=-1)
        col_mean = (squared.sum(dim=0) + (num_rows - rows.numel()) * eps) / num_rows
        exp_avg_sq_row, exp_avg_sq_col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        exp_avg_sq_row.mul_(beta2t).add_(row_mean, alpha=1.0 - beta2t)
        exp_avg_sq_col.mul_(beta2t).add_(col_mean, alpha=1.0 - beta2t)

        r_factor = (exp_avg_sq_row[rows] / exp_avg_sq_row.mean()).rsqrt_().unsqueeze(-1)  # [n, 1]
        update = r_factor * exp_avg_sq_col.rsqrt().unsqueeze(0) * values  # [n, C]; zero on untouched rows
        update_rms = update.norm(2) / math.sqrt(num_rows * num_cols)
        update.div_((update_rms / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["weight_decay"] != 0:
            p.add_(p, alpha=-group["weight_decay"] * lr)
        p.index_add_(0, rows, update, alpha=-1.0)
