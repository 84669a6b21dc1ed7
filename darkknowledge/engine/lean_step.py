"""``optimizer.step()`` for torch's fused SGD, Adam and AdamW without its per-call Python work.

``torch.optim.Optimizer.step`` rebuilds its lists of parameters, gradients and state
tensors on every call (state lookups, device/dtype grouping, hooks, profiler records) before
it reaches the one fused kernel that does the update. For a small model that bookkeeping
costs more than the update itself: on a 2-core CPU and a 3-layer MLP it is 10-15% of a
training step. :class:`LeanStep` lets the optimizer take its first step itself (which
creates the state), then keeps those lists and calls the same fused kernel with the group's
current hyper-parameters (so schedules that change ``lr`` apply). The state tensors are the
optimizer's own, updated in place: ``optimizer.state_dict()`` stays exact.

It steps through ``optimizer.step()`` instead whenever the shortcut would not be the same
update: an optimizer other than plain ``SGD``/``Adam``/``AdamW`` built with ``fused=True``,
AMSGrad, capturable or differentiable groups, tensor learning rates, registered step hooks,
or a parameter without a gradient in this step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

log = logging.getLogger(__name__)

_KINDS = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam", torch.optim.AdamW: "adamw"}
KERNELS = {"sgd": "_fused_sgd_", "adam": "_fused_adam_", "adamw": "_fused_adamw_"}  # torch's fused in-place updates


@dataclass
class _Bundle:
    """The tensors of one param group on one device and dtype, in a fixed order."""

    group: dict[str, Any]
    params: list[torch.Tensor]
    state: list[list[torch.Tensor]]  # SGD: [momentum buffers] or []; Adam: [exp_avg, exp_avg_sq, step]


def _group_supported(kind: str, group: dict[str, Any]) -> bool:
    if not group.get("fused") or group.get("differentiable") or isinstance(group["lr"], torch.Tensor):
        return False
    if kind != "sgd" and (group.get("amsgrad") or group.get("capturable")):
        return False
    return True


def _capture(opt: torch.optim.Optimizer, kind: str) -> list[_Bundle] | None:
    """The bundles of ``opt`` after a step, or None when some state is missing or unsupported."""
    bundles: list[_Bundle] = []
    for group in opt.param_groups:
        if not _group_supported(kind, group):
            return None
        split: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in group["params"]:
            split.setdefault((p.device, p.dtype), []).append(p)
        for params in split.values():
            states = [opt.state.get(p, {}) for p in params]
            if kind == "sgd":
                if group["momentum"] == 0:
                    state: list[list[torch.Tensor]] = []
                else:
                    bufs = [s.get("momentum_buffer") for s in states]
                    if any(b is None for b in bufs):
                        return None
                    state = [bufs]
            else:
                keys = ("exp_avg", "exp_avg_sq", "step")
                if any(k not in s for s in states for k in keys):
                    return None
                state = [[s[k] for s in states] for k in keys]
            bundles.append(_Bundle(group, params, state))
    return bundles


class LeanStep:
    """Steps ``optimizer`` through its fused kernel directly once its state exists.

    Args:
        optimizer: Any optimizer; only fused ``SGD``/``Adam``/``AdamW`` take the shortcut.

    Call :meth:`reset` after ``optimizer.load_state_dict`` (its state tensors are replaced).
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.kind = _KINDS.get(type(optimizer))
        self._bundles: list[_Bundle] | None = None
        self.lean_steps = 0  # steps taken by the shortcut (for tests and diagnostics)

    def reset(self) -> None:
        """Forget the captured tensors; the next step goes through ``optimizer.step()``."""
        self._bundles = None

    def _still_valid(self, bundles: list[_Bundle]) -> bool:
        """No step hooks to run, and every group's options still match the captured state."""
        opt = self.optimizer
        if (
            _global_optimizer_pre_hooks
            or _global_optimizer_post_hooks
            or opt._optimizer_step_pre_hooks
            or opt._optimizer_step_post_hooks
        ):
            return False
        kind: str = self.kind  # type: ignore[assignment]  # set: _capture ran
        return all(
            _group_supported(kind, b.group)
            and (kind != "sgd" or (b.group["momentum"] != 0) == bool(b.state))  # momentum toggled
            for b in bundles
        )

    def step(self) -> None:
        """One optimizer step, the same update as ``optimizer.step()``."""
        bundles = self._bundles
        if bundles is not None:
            grads = [[p.grad for p in b.params] for b in bundles]
            if not any(g is None for gs in grads for g in gs) and self._still_valid(bundles):
                with torch.no_grad():
                    if self.lean_steps:
                        for bundle, gs in zip(bundles, grads):
                            self._update(bundle, gs)  # type: ignore[arg-type]  # no grad is None: checked
                    elif not self._first_update(bundles, grads):  # type: ignore[arg-type]  # no grad is None: checked
                        self.optimizer.step()
                        return
                self.lean_steps += 1
                return
        self.optimizer.step()
        self._bundles = _capture(self.optimizer, self.kind) if self.kind is not None else None

    def _first_update(self, bundles: list[_Bundle], grads: list[list[torch.Tensor]]) -> bool:
        """The first direct call; a torch whose kernels are missing or take other arguments
        fails before updating anything: then the shortcut is off for good (False)."""
        try:
            for bundle, gs in zip(bundles, grads):
                self._update(bundle, gs)
        except (TypeError, AttributeError) as err:
            if self.kind != "sgd":
                torch._foreach_sub_(bundles[0].state[2], 1)  # undo the step count the failed call added
            log.warning(
                "the fused %s kernel cannot be called directly in this torch (%s); using optimizer.step()",
                self.kind,
                err,
            )
            self.kind, self._bundles = None, None
            return False
        return True

    def _update(self, b: _Bundle, grads: list[torch.Tensor]) -> None:
        g = b.group
        if self.kind == "sgd":
            getattr(torch, KERNELS["sgd"])(
                b.params,
                grads,
                b.state[0] if b.state else [],
                weight_decay=g["weight_decay"],
                momentum=g["momentum"],
                lr=g["lr"],
                dampening=g["dampening"],
                nesterov=g["nesterov"],
                maximize=g["maximize"],
                is_first_step=False,
            )
            return
        exp_avgs, exp_avg_sqs, steps = b.state
        torch._foreach_add_(steps, 1)
        decoupled = g.get("decoupled_weight_decay", self.kind == "adamw")
        kernel = getattr(torch, KERNELS["adamw" if decoupled else "adam"])
        beta1, beta2 = g["betas"]
        kernel(
            b.params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            lr=g["lr"],
            beta1=float(beta1),
            beta2=float(beta2),
            weight_decay=g["weight_decay"],
            eps=g["eps"],
            maximize=g["maximize"],
            grad_scale=None,
            found_inf=None,
        )
