"""Structured pruning of a Llama-family causal LM into a smaller student (pure tensor logic, no I/O).

The real kit (``ddk.kit.real``) cuts its student out of its teacher the way Minitron (Muralidharan et al.,
2024, "Compact Language Models via Pruning and Knowledge Distillation") and Sheared-LLaMA (Xia et al., 2023)
do, before a short healing run:

- **depth**: drop whole decoder layers, the ones that change the hidden state least. A layer's importance is
  its Block Influence (ShortGPT, Men et al., 2024): BI_i = 1 - mean over tokens of cos(h_i, h_{i+1}), where
  h_i is the hidden state entering layer i and h_{i+1} the one leaving it. A layer whose output points where
  its input did (BI near 0) adds little.
- **width**: keep the MLP's most active intermediate neurons (Minitron's activation-based importance: the
  mean |act(gate(x)) * up(x)| per neuron on calibration text), slicing gate/up rows and down columns alike.

Embeddings, attention and norms are kept as they are: the student shares the teacher's tokenizer and
(tied) embedding matrix, so it speaks the same vocabulary from the first step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_influence(hidden_states: Sequence[torch.Tensor]) -> list[float]:
    """BI_i = 1 - mean cos(h_i, h_{i+1}) over every token, for each of the ``len(hidden_states) - 1`` layers.

    ``hidden_states`` is what a transformers model returns with ``output_hidden_states=True``: the embedding
    output, then one [batch, seq, hidden] tensor after each layer (the last after the final norm in Llama,
    so the last layer's BI includes the norm: it only ever makes that layer look more important).
    """
    if len(hidden_states) < 2:
        raise ValueError("block_influence needs the hidden states before and after at least one layer")
    out = []
    for a, b in zip(hidden_states[:-1], hidden_states[1:]):
        cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
        out.append(float(1.0 - cos.mean()))
    return out


def layers_to_keep(influence: Sequence[float], keep: int) -> list[int]:
    """The indices of the ``keep`` most influential layers, in model order (ties: the earlier layer)."""
    n = len(influence)
    if not 1 <= keep <= n:
        raise ValueError(f"keep must be in 1..{n}, got {keep}")
    ranked = sorted(range(n), key=lambda i: (-influence[i], i))
    return sorted(ranked[:keep])


def prune_depth(model, keep: Sequence[int]) -> None:
    """Keep only the decoder layers ``keep`` (in that order), in place; fixes the config and layer indices."""
    layers = model.model.layers
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < len(layers) for i in keep):
        raise ValueError(f"keep must be distinct layer indices in 0..{len(layers) - 1}, got {list(keep)}")
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j  # the KV cache's slot
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def mlp_neurons_to_keep(importance: torch.Tensor, ffn: int) -> torch.Tensor:
    """The ``ffn`` most important intermediate neurons of one MLP, in index order (a LongTensor)."""
    if not 1 <= ffn <= importance.numel():
        raise ValueError(f"ffn must be in 1..{importance.numel()}, got {ffn}")
    return importance.topk(ffn).indices.sort().values


@torch.no_grad()
def prune_mlp(model, keep_per_layer: Sequence[torch.Tensor]) -> None:
    """Slice every layer's MLP to its kept neurons (gate/up rows, down columns), in place."""
    sizes = {int(k.numel()) for k in keep_per_layer}
    if len(keep_per_layer) != len(model.model.layers) or len(sizes) != 1:
        raise ValueError("prune_mlp needs one index set per layer, all of the same size")
    for layer, idx in zip(model.model.layers, keep_per_layer):
        mlp = layer.mlp
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, idx.numel(), bias=old.bias is not None, dtype=old.weight.dtype)
            new.weight.copy_(old.weight[idx])
            if old.bias is not None:
                new.bias.copy_(old.bias[idx])
            setattr(mlp, name, new)
        old = mlp.down_proj
        new = torch.nn.Linear(idx.numel(), old.out_features, bias=old.bias is not None, dtype=old.weight.dtype)
        new.weight.copy_(old.weight[:, idx])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        mlp.down_proj = new
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = idx.numel()
    model.config.intermediate_size = sizes.pop()


@torch.no_grad()
def mlp_importance(model, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the mean |input of down_proj| per intermediate neuron over ``input_ids`` (Minitron)."""
    found: dict[int, torch.Tensor] = {}
    hooks = []
    for j, layer in enumerate(model.model.layers):
        def hook(_mod, inputs, _out, j=j):
            found[j] = inputs[0].abs().double().mean(dim=tuple(range(inputs[0].dim() - 1)))
        hooks.append(layer.mlp.down_proj.register_forward_hook(hook))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [found[j].float() for j in range(len(model.model.layers))]


@torch.no_grad()
def layer_influence(model, input_ids: torch.Tensor) -> list[float]:
    """Block Influence of each decoder layer of ``model`` on ``input_ids``."""
    out = model(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    return block_influence(out.hidden_states)
