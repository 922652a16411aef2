"""SmoothQuant (Xiao et al. 2022) on a BERT-family torch encoder, before the ONNX export.

int8 with per-token (per-row) activation scales handles tokens of very different magnitude, but not
the few hidden channels that are large for every token (RoBERTa / XLM-R have them): one such channel
sets the row's scale and the other channels lose most of their 8 bits. SmoothQuant moves that range
from the activations into the weights, per input channel j of a linear layer:

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha),    X W^T = (X diag(1/s)) (W diag(s))^T

so the transformation is exact in fp32; only what int8 sees changes.

Where 1/s goes (BERT, RoBERTa and XLM-R are **post-LN**: a LayerNorm output is also the residual
stream, so folding 1/s into its weight and bias would change the residual; it is not exact):
- Q/K/V (one input, one shared s) and FFN-in: an explicit per-channel multiply on the linear's
  input (`SmoothedLinear`: one `Mul` in the exported graph, shared by Q, K and V);
- attention output: folded into V's output channels (weight rows and bias; exact, since every
  row of the softmax sums to 1 and each V channel feeds exactly one context channel), so free;
- FFN-out (after GELU): nothing to fold into; an explicit multiply like FFN-in, or left alone
  (`smooth=` picks; the default is what the measurements below support).

Measured on the real all-MiniLM-L6-v2 weights (`python -m bench.int8_forms accuracy`; the whole
table is in model_build/quantize.py), dense cosine of the per-row int8 graph against fp32 over 64
multilingual texts: without SmoothQuant min 0.984 / mean 0.9968; with it (alpha 0.5, the default
roles) min 0.9951 / mean 0.9989; without the FFN-in role min 0.9922; without the V fold 0.9941;
alpha 0.4 / 0.65 gave min 0.9936 / 0.9945.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# The projections SmoothQuant can smooth, by role in a transformer layer.
ROLES = ("qkv", "attn_out", "ffn_in", "ffn_out")
# FFN-out is left alone by default: its input (GELU output, >= -0.17) is quantized asymmetrically
# by model_build/quantize.py, and smoothing it as well measured no gain (MiniLM dense cosine min
# 0.9953 with vs 0.9951 without, mean 0.9989 both) for one more [tokens x 4096] Mul per layer.
DEFAULT_SMOOTH: tuple[str, ...] = ("qkv", "attn_out", "ffn_in")

# Submodule paths of one encoder layer, by family; the first layout whose six paths are all
# nn.Linear in a module is used. BERT, RoBERTa, XLM-RoBERTa (bge-m3), ELECTRA and CamemBERT share
# the first one in transformers 5.
LAYER_LAYOUTS: tuple[dict[str, str], ...] = (
    {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "fc1": "intermediate.dense",
        "fc2": "output.dense",
    },
)

# Scales are clamped so that a dead channel (max |x| == 0) or a zero weight column cannot make
# the transformation singular.
_SCALE_MIN = 1e-5
_SCALE_MAX = 1e5
# Rows of the first calibration batch kept for the equivalence self-check.
_PROBE_ROWS = 4
_EQUIVALENCE_TOL = 1e-3


@dataclass
class Stats:
    """Per-input-channel max |x| of every nn.Linear, over the real (unpadded) calibration tokens."""

    act_absmax: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    batches: int = 0
    # A few rows of the first batch: apply_smoothquant checks its output before and after on it.
    probe: dict[str, torch.Tensor] | None = None

    def summary(self) -> dict[str, Any]:
        return {"batches": self.batches, "tokens": self.tokens, "linears": len(self.act_absmax)}


class SmoothedLinear(nn.Linear):
    """`linear(x * inv_scale)` with the weight already multiplied by the scale.

    A subclass, so code that looks for nn.Linear still finds it; the state dict keeps `weight` and
    `bias` and adds `smooth_inv_scale`. Q, K and V share one `smooth_inv_scale` tensor, which the
    exporter writes once; the quantizer merges the three identical `Mul` nodes into one.
    """

    smooth_inv_scale: torch.Tensor

    def __init__(self, linear: nn.Linear, inv_scale: torch.Tensor):
        super().__init__(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
        )
        self.weight = linear.weight
        self.bias = linear.bias
        self.register_buffer("smooth_inv_scale", inv_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x * self.smooth_inv_scale, self.weight, self.bias)


def _batch_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    mask = batch.get("attention_mask")
    return None if mask is None else mask.to(torch.bool)


def collect_activation_stats(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]
) -> Stats:
    """Run `model(**batch)` on each batch with forward hooks on every nn.Linear, recording the
    per-input-channel max |x| over the calibration tokens. Padding positions are excluded (their
    hidden states are computed but never used). Works for any module whose forward takes the
    tokenizer's keys (input_ids, attention_mask[, token_type_ids])."""
    stats = Stats()
    current_mask: list[torch.Tensor | None] = [None]

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0].detach()
            mask = current_mask[0]
            if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                rows = x[mask]
            else:  # e.g. the pooler's dense on the first token: every row is a real token
                rows = x.reshape(-1, x.shape[-1])
            if rows.shape[0] == 0:
                return
            amax = rows.abs().amax(dim=0).float()
            prev = stats.act_absmax.get(name)
            stats.act_absmax[name] = amax if prev is None else torch.maximum(prev, amax)

        return hook

    handles = [
        module.register_forward_hook(make_hook(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                inputs = dict(batch)
                mask = _batch_mask(inputs)
                current_mask[0] = mask
                model(**inputs)
                stats.batches += 1
                if mask is not None:
                    stats.tokens += int(mask.sum())
                else:
                    stats.tokens += int(inputs["input_ids"].numel())
                if stats.probe is None:
                    stats.probe = {k: v[:_PROBE_ROWS].clone() for k, v in inputs.items()}
    finally:
        current_mask[0] = None
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if not stats.act_absmax:
        raise ValueError("collect_activation_stats: the model has no nn.Linear or saw no batch")
    return stats


@dataclass
class _Layer:
    prefix: str
    parts: dict[str, nn.Linear]  # q, k, v, o, fc1, fc2
    names: dict[str, str]  # the same keys: qualified module names (the keys of Stats)
    parents: dict[str, tuple[nn.Module, str]]  # where to swap in a SmoothedLinear


def _submodule(root: nn.Module, path: str) -> tuple[nn.Module, nn.Module, str] | None:
    parent = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = getattr(parent, part, None)
        if not isinstance(child, nn.Module):
            return None
        parent = child
    leaf = getattr(parent, parts[-1], None)
    if not isinstance(leaf, nn.Module):
        return None
    return leaf, parent, parts[-1]


def find_layers(model: nn.Module) -> list[_Layer]:
    """Every transformer layer of the model, found by structure (a module holding the six
    projections of one of LAYER_LAYOUTS), wherever it sits (encoder.layer.N, a wrapper's
    backbone, a sentence-transformers module...)."""
    layers: list[_Layer] = []
    for prefix, module in model.named_modules():
        for layout in LAYER_LAYOUTS:
            found = {role: _submodule(module, path) for role, path in layout.items()}
            if all(
                f is not None and type(f[0]) in (nn.Linear, SmoothedLinear) for f in found.values()
            ):
                parts: dict[str, nn.Linear] = {}
                parents: dict[str, tuple[nn.Module, str]] = {}
                for role, hit in found.items():
                    assert hit is not None
                    leaf, parent, attr = hit
                    assert isinstance(leaf, nn.Linear)
                    parts[role] = leaf
                    parents[role] = (parent, attr)
                names = {
                    role: f"{prefix}.{path}" if prefix else path for role, path in layout.items()
                }
                layers.append(_Layer(prefix, parts, names, parents))
                break
    return layers


def _scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1-alpha) over all weights sharing the input."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0)
    a = act_absmax.float().to(w_absmax.device)
    scale = a.pow(alpha) / w_absmax.pow(1.0 - alpha)
    ok = (a > 0) & (w_absmax > 0) & torch.isfinite(scale)
    scale = torch.where(ok, scale, torch.ones_like(scale))
    return scale.clamp(_SCALE_MIN, _SCALE_MAX)


def _describe(scale: torch.Tensor) -> dict[str, float]:
    return {
        "min": round(float(scale.min()), 6),
        "median": round(float(scale.median()), 6),
        "max": round(float(scale.max()), 6),
    }


def _first_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    if isinstance(out, tuple | list) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find a tensor in the model output {type(out).__name__}")


def apply_smoothquant(
    model: nn.Module,
    stats: Stats,
    alpha: float = 0.5,
    *,
    smooth: Collection[str] = DEFAULT_SMOOTH,
) -> dict[str, Any]:
    """Smooth every transformer layer of `model` in place (exact in fp32); return a JSON-able
    report. `smooth` picks the roles among ROLES (DEFAULT_SMOOTH: all but ffn_out)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    unknown = set(smooth) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; choose from {ROLES}")
    layers = find_layers(model)
    if any(isinstance(m, SmoothedLinear) for layer in layers for m in layer.parts.values()):
        raise ValueError(f"{type(model).__name__} is already smoothed")
    if not layers:
        raise ValueError(
            f"{type(model).__name__}: no transformer layer found (looked for "
            + " / ".join(sorted({p for layout in LAYER_LAYOUTS for p in layout.values()}))
            + ")"
        )

    reference: torch.Tensor | None = None
    if stats.probe is not None:
        with torch.no_grad():
            reference = _first_output(model(**stats.probe)).detach().clone()

    projections: list[dict[str, Any]] = []
    with torch.no_grad():
        for layer in layers:
            p, n = layer.parts, layer.names
            if "qkv" in smooth:
                act = _stat(stats, n["q"], n["k"], n["v"])
                scale = _scales(act, [p["q"].weight, p["k"].weight, p["v"].weight], alpha)
                inv = (1.0 / scale).to(p["q"].weight.dtype)
                for role in ("q", "k", "v"):
                    p[role].weight.mul_(scale.to(p[role].weight.dtype))
                    parent, attr = layer.parents[role]
                    setattr(parent, attr, SmoothedLinear(p[role], inv))
                projections.append(_entry("qkv", [n["q"], n["k"], n["v"]], "mul", scale))
            if "attn_out" in smooth:
                act = _stat(stats, n["o"])
                scale = _scales(act, [p["o"].weight], alpha)
                v = p["v"]
                v.weight.div_(scale.to(v.weight.dtype)[:, None])
                if v.bias is not None:
                    v.bias.div_(scale.to(v.bias.dtype))
                p["o"].weight.mul_(scale.to(p["o"].weight.dtype))
                projections.append(_entry("attn_out", [n["o"]], "fold-into-value", scale))
            for role, key in (("ffn_in", "fc1"), ("ffn_out", "fc2")):
                if role not in smooth:
                    continue
                act = _stat(stats, n[key])
                scale = _scales(act, [p[key].weight], alpha)
                p[key].weight.mul_(scale.to(p[key].weight.dtype))
                parent, attr = layer.parents[key]
                setattr(parent, attr, SmoothedLinear(p[key], (1.0 / scale).to(p[key].weight.dtype)))
                projections.append(_entry(role, [n[key]], "mul", scale))

    report: dict[str, Any] = {
        "method": "smoothquant",
        "alpha": alpha,
        "layers": len(layers),
        "smoothed": sorted(set(smooth), key=ROLES.index),
        "not_smoothed": [r for r in ROLES if r not in smooth],
        "how": {
            "qkv": "explicit per-channel Mul on the shared input (post-LN: the LayerNorm output "
            "is also the residual, so folding into it would not be exact)",
            "attn_out": "folded into the value projection's output channels (exact, free)",
            "ffn_in": "explicit per-channel Mul on the input (post-LN, as for qkv)",
            "ffn_out": "explicit per-channel Mul on the GELU output (nothing to fold into)",
        },
        "calibration": stats.summary(),
        "projections": projections,
    }
    if reference is not None and stats.probe is not None:
        with torch.no_grad():
            after = _first_output(model(**stats.probe))
        diff = float((after - reference).abs().max())
        scale_ref = float(reference.abs().max())
        report["equivalence"] = {
            "probe_rows": int(next(iter(stats.probe.values())).shape[0]),
            "max_abs_diff": diff,
            "output_abs_max": scale_ref,
        }
        if not math.isfinite(diff) or diff > _EQUIVALENCE_TOL * max(1.0, scale_ref):
            raise RuntimeError(
                f"SmoothQuant changed the fp32 output by {diff:.3g} (tolerance "
                f"{_EQUIVALENCE_TOL * max(1.0, scale_ref):.3g}); the layer layout is not the one "
                "this module assumes"
            )
    return report


def _stat(stats: Stats, *names: str) -> torch.Tensor:
    found = [stats.act_absmax[n] for n in names if n in stats.act_absmax]
    if not found:
        raise KeyError(
            f"no activation statistics for {', '.join(names)}: collect them on the same module "
            "that is smoothed"
        )
    return torch.stack(found).amax(dim=0)


def _entry(role: str, names: list[str], how: str, scale: torch.Tensor) -> dict[str, Any]:
    return {"role": role, "modules": names, "how": how, "scale": _describe(scale)}
