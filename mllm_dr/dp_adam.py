"""DP-AdamBC: Adam whose second moment has the DP noise's variance taken out (Tang, Panda, Sharma,
"DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless You Apply Bias Correction)", AAAI 2024).

Under DP-SGD each step's gradient is g + N(0, phi) per number, phi = (noise_multiplier x clip_norm /
expected patients per step)^2 (public: post-processing, no privacy cost). Adam's second moment then
estimates g^2 + phi; where the noise dominates (almost every number of a LoRA adapter at a hospital's
size) Adam divides every number by ~sqrt(phi) and takes full-size steps in the noise's directions.
DP-AdamBC divides by sqrt(max(v_hat - phi, floor)) instead, the floor (tuned in the paper) phi by
default. With phi = 0 and floor 0 it is exactly ``torch.optim.AdamW`` (weight decay 0), which the tests check.

Measured (README, "Session 21"; one site, SmolLM2, 19 training patients, seed 0): at the noise a
5,000-patient site puts on a step's mean at epsilon 8 it kept no more CCC than AdamW (0.00 both): with
floor phi a number whose gradient is noise still moves ~lr a step, whatever the noise's size. A fixed,
public floor (clip_norm^2 / trained numbers: momentum SGD where the noise dominates) stopped learning
even without noise: this model learns in its step budget only through Adam's per-number scaling.
"""

from __future__ import annotations

import torch


class DPAdamBC(torch.optim.Optimizer):
    def __init__(self, params, noise_variance: float, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, floor: float | None = None):
        if noise_variance < 0:
            raise ValueError(f"noise_variance must be >= 0, got {noise_variance}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        self.noise_variance = float(noise_variance)
        self.floor = self.noise_variance if floor is None else float(floor)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["m"] / (1 - beta1 ** t)
                v_hat = state["v"] / (1 - beta2 ** t)
                denom = (v_hat - self.noise_variance).clamp_min(self.floor).sqrt().add_(group["eps"])
                p.addcdiv_(m_hat, denom, value=-group["lr"])
        return loss
