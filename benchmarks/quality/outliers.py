"""Uneven input energy without retraining: an exact, function-preserving channel rescaling.

The linears of real LLMs read inputs whose channels differ in energy by orders of magnitude
(outlier features); the minutes-trained benchmark models do not (diag H varies by ~15% across
q/k/v/gate/up columns). This gives them that spread exactly, with a reparametrisation applied
identically to the base and every expert. For each decoder block, per-channel factors s > 0 drawn
log-normally (log s ~ N(0, sigma^2), the same draws for every model) move scale from a linear's
columns to what feeds them:

- ``input_layernorm.weight *= s`` and ``q/k/v_proj.weight[:, c] /= s_c``;
- ``post_attention_layernorm.weight *= s`` and ``gate/up_proj.weight[:, c] /= s_c``;
- ``v_proj.weight[c, :] *= s_c`` and the ``o_proj`` columns that read value channel c ``/= s_c``
  (attention is linear in the values);
- ``up_proj.weight[c, :] *= s_c`` and ``down_proj.weight[:, c] /= s_c`` (the MLP is linear in
  ``up``).

Every model computes the same function as before (up to float rounding), so losses and gains are
unchanged. What changes is what trimming sees: the entries of tau in a column with factor s_c
shrink by s_c while their effect on the output does not. The ``wanda`` score tau^2 H_cc is
invariant to this; magnitude trimming is not. The norm weights' task vectors grow by s and go
through the stock fallback rule, the same for every method.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel

from mergekit_sparsegpt.demo.build import Family
from mergekit_sparsegpt.demo.tiny import load_model, save_model

MARKER = "spread.json"


@torch.no_grad()
def spread_input_channels(model: PreTrainedModel, sigma: float, seed: int) -> None:
    """Rescale a Llama's input channels in place (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // config.num_key_value_heads

    def factors(count: int) -> torch.Tensor:
        return torch.exp(sigma * torch.randn(count, generator=generator))

    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        for norm, readers in (
            (layer.input_layernorm, (attention.q_proj, attention.k_proj, attention.v_proj)),
            (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
        ):
            scale = factors(norm.weight.numel())
            norm.weight.mul_(scale)
            for linear in readers:
                linear.weight.div_(scale)
        value_scale = factors(attention.v_proj.out_features)
        attention.v_proj.weight.mul_(value_scale[:, None])
        # o_proj column h * head_dim + d reads value channel (h // groups) * head_dim + d.
        per_head = value_scale.reshape(config.num_key_value_heads, head_dim)
        attention.o_proj.weight.div_(per_head.repeat_interleave(groups, dim=0).reshape(-1))
        up_scale = factors(mlp.up_proj.out_features)
        mlp.up_proj.weight.mul_(up_scale[:, None])
        mlp.down_proj.weight.div_(up_scale)
        for linear in (attention.v_proj, mlp.up_proj):
            if linear.bias is not None:
                raise ValueError("spread_input_channels assumes linears without bias")


def spread_family(family: Family, root: Path, sigma: float, seed: int) -> Family:
    """A copy of ``family`` with every model rescaled by the same factors (skips finished ones)."""
    tokenizer = AutoTokenizer.from_pretrained(str(family.tokenizer))
    sources = {"base": family.base, **{f"expert_{n}": p for n, p in family.experts.items()}}
    for name, source in sources.items():
        target = root / name
        if (target / MARKER).is_file():
            continue
        model = load_model(source)
        spread_input_channels(model, sigma, seed)
        save_model(model, tokenizer, target)
        info = {"source": str(source), "sigma": sigma, "seed": seed}
        (target / MARKER).write_text(json.dumps(info), encoding="utf-8")
    return Family(
        root=root,
        base=root / "base",
        experts={n: root / f"expert_{n}" for n in family.experts},
        calibration=family.calibration,
        tokenizer=family.tokenizer,
    )
