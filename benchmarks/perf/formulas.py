"""Closed-form costs of a Llama: FLOPs of a forward pass and of Hessian capture, and bytes of the
model, its activations, one block's Hessians and a task's statistics cache entry.

Pure arithmetic on a :class:`LlamaShape`, so the benchmark's bounds can be checked by hand and by
the tests without running anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FLOAT32_BYTES = 4
# Per-column vectors a cache entry holds for every Hessian group (hessian.HessianStatistics):
# diag H, diag H^-1 and the diagonal of U = chol(H^-1).
VECTORS_PER_GROUP = 3


@dataclass(frozen=True)
class LlamaShape:
    """The sizes of a Llama that costs depend on (untied embeddings, no biases)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> LlamaShape:
        """From a transformers ``LlamaConfig`` (or anything with the same attributes)."""
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads or config.num_attention_heads,
            vocab=config.vocab_size,
        )

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def attention_dim(self) -> int:
        """Width of q (and of o_proj's input)."""
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def block_linear_params(shape: LlamaShape) -> int:
    """Weights of one decoder block's linears: q, k, v, o, gate, up, down."""
    attention = shape.hidden * (shape.attention_dim + 2 * shape.kv_dim)  # q, k, v
    attention += shape.attention_dim * shape.hidden  # o
    mlp = 3 * shape.hidden * shape.intermediate  # gate, up, down
    return attention + mlp


def block_params(shape: LlamaShape) -> int:
    """One decoder block: its linears and its two RMSNorm weights."""
    return block_linear_params(shape) + 2 * shape.hidden


def model_params(shape: LlamaShape) -> int:
    """Embeddings, blocks, final norm and an untied lm_head."""
    embeddings = 2 * shape.vocab * shape.hidden
    return embeddings + shape.layers * block_params(shape) + shape.hidden


def hessian_group_widths(shape: LlamaShape) -> tuple[int, ...]:
    """d_in of each distinct Hessian one block gets: q/k/v share one, gate/up share one."""
    return (shape.hidden, shape.attention_dim, shape.hidden, shape.intermediate)


def forward_flops(
    shape: LlamaShape, tokens: int, seq_len: int, causal_halving: bool = False
) -> float:
    """Multiply-adds x 2 of a forward pass over ``tokens`` tokens in windows of ``seq_len``.

    Every linear including lm_head, plus attention scores and the weighted sum of values
    (4 x tokens x seq_len x attention_dim per block). The default counts the whole score matrix,
    as PyTorch's CPU attention computes it; ``causal_halving`` counts only its lower triangle.
    Norms, rotary embeddings, softmax and activations are left out (a few % at most).
    """
    linear = shape.layers * block_linear_params(shape) + shape.vocab * shape.hidden
    attention = 4 * tokens * seq_len * shape.attention_dim * shape.layers
    if causal_halving:
        attention /= 2
    return 2 * tokens * linear + attention


def hessian_flops(shape: LlamaShape, tokens: int) -> float:
    """Accumulating H += X^T X for every Hessian group, the output head's included
    (d_in = hidden): 2 x tokens x d_in^2 each."""
    per_block = sum(width**2 for width in hessian_group_widths(shape))
    return 2 * tokens * (shape.layers * per_block + shape.hidden**2)


def diagonal_hessian_flops(shape: LlamaShape, tokens: int) -> float:
    """Accumulating diag H += x^2 for every Hessian group, the head's included: 2 x tokens x
    d_in each (a merge that reads only diagonals)."""
    per_block = sum(hessian_group_widths(shape))
    return 2 * tokens * (shape.layers * per_block + shape.hidden)


def prepass_flop_bound_ratio(
    shape: LlamaShape,
    tokens: int,
    seq_len: int,
    causal_halving: bool = False,
    diagonal: bool = False,
) -> float:
    """(forward + Hessian FLOPs) / forward FLOPs: the least the pre-pass can cost relative to a
    forward pass doing the same arithmetic per FLOP (``diagonal``: accumulating diag H alone).
    The Cholesky factorisations (O(d^3) per group, independent of tokens) and the norms'
    O(tokens x d) energies are left out, so this is a lower bound."""
    forward = forward_flops(shape, tokens, seq_len, causal_halving)
    extra = (diagonal_hessian_flops if diagonal else hessian_flops)(shape, tokens)
    return (forward + extra) / forward


def model_bytes(shape: LlamaShape) -> int:
    return FLOAT32_BYTES * model_params(shape)


def block_bytes(shape: LlamaShape) -> int:
    return FLOAT32_BYTES * block_params(shape)


def activation_bytes(shape: LlamaShape, samples: int, seq_len: int) -> int:
    """One copy of the hidden states of the whole calibration set, float32."""
    return FLOAT32_BYTES * samples * seq_len * shape.hidden


def block_hessian_bytes(shape: LlamaShape) -> int:
    """The float32 Hessians of one decoder block."""
    return FLOAT32_BYTES * sum(width**2 for width in hessian_group_widths(shape))


# Square matrices the factorisation of one Hessian group holds at once beyond the Hessian itself
# (hessian.py): its private copy, damped in place, with the Cholesky factor, then H^-1, then U.
FACTORISATION_MATRICES = 3


def factorisation_bytes(shape: LlamaShape) -> int:
    """Working matrices of the widest group's factorisation (one group at a time)."""
    return FLOAT32_BYTES * FACTORISATION_MATRICES * max(hessian_group_widths(shape)) ** 2


def batch_temporary_bytes(shape: LlamaShape, batch: int, seq_len: int) -> int:
    """What one batch's pass through a block allocates beyond its input and output: the attention
    scores and their softmax, and the MLP's gate, up and activated product."""
    attention = 2 * batch * shape.heads * seq_len**2
    mlp = 3 * batch * seq_len * shape.intermediate
    return FLOAT32_BYTES * max(attention, mlp)


def cache_bytes_per_task(shape: LlamaShape, hessians: bool, factors: bool) -> int:
    """Tensor data of one task's cache entry (the safetensors header comes on top).

    Every Hessian group keeps three float32 vectors of d_in; RegMean adds the whole H and
    ``compensate`` the whole Cholesky factor U, d_in x d_in each. Besides the blocks' groups:
    the output head's (d_in = hidden), the token counts (one float32 per vocabulary entry) and
    every norm's channel energies (a diagonal group: its three vectors only; two norms a block
    and the final norm).
    """
    whole_matrices = int(hessians) + int(factors)

    def group(width: int) -> int:
        return VECTORS_PER_GROUP * width + whole_matrices * width**2

    per_block = sum(group(width) for width in hessian_group_widths(shape))
    norms = VECTORS_PER_GROUP * shape.hidden * (NORMS_PER_BLOCK * shape.layers + 1)
    return FLOAT32_BYTES * (shape.layers * per_block + group(shape.hidden) + shape.vocab + norms)


# A Llama block's norms (input_layernorm, post_attention_layernorm), each a scale of hidden.
NORMS_PER_BLOCK = 2


# Llama-2-7B: MHA (kv heads = heads), untied lm_head.
LLAMA2_7B = LlamaShape(
    hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000
)
