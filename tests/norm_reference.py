"""A plain reference for the norms' statistics: each norm's normalized input by its textbook
formula (not by the package's weight trick), and its per-channel energy (2/n) sum x_hat^2."""

from __future__ import annotations

import torch


def is_reference_norm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def textbook_normalized(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x_hat in float64: LayerNorm's (x - mean) / sqrt(var + eps), RMSNorm's x / rms."""
    x = x.double()
    if isinstance(module, torch.nn.LayerNorm):
        centred = x - x.mean(-1, keepdim=True)
        return centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + module.eps)
    eps = getattr(module, "variance_epsilon", None) or module.eps
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


def reference_norm_energies(model: torch.nn.Module, run, sequences: int) -> dict[str, torch.Tensor]:
    """Every norm's (2/n) sum x_hat^2 per channel (n = ``sequences``) while ``run()`` runs a
    forward pass of ``model``, by checkpoint name of its weight, in float64."""
    energies: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if is_reference_norm(module) and getattr(module, "weight", None) is not None:

            def hook(module, args, name=f"{name}.weight"):
                x_hat = textbook_normalized(module, args[0])
                total = x_hat.reshape(-1, x_hat.shape[-1]).square().sum(0)
                energies[name] = energies.get(name, 0) + total

            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return {name: 2 / sequences * total for name, total in energies.items()}


def perturb_vectors(model: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Norm scales (and biases) away from their ones/zeros init, so that a norm whose weight
    were read as 1 would show."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(scale * torch.randn_like(parameter))
    return model
