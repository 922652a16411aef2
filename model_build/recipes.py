"""Stages 2 and 3, load and export: the PyTorch model of a recipe and its single ONNX graph.

Both recipes take `input_ids` and `attention_mask` (int64, [batch, sequence]).

- bge-m3 (FlagEmbedding `m3.py` numerics), three outputs:
  `dense` = normalize(last_hidden[:, 0]);
  `sparse` = relu(sparse_linear(last_hidden)).squeeze(-1), one weight per token (the engine takes
  the max per id and drops the specials);
  `colbert` = normalize(colbert_linear(last_hidden[:, 1:]) * mask[:, 1:, None]) (padded rows are 0).
- dense (sentence-transformers): `dense` = pooling (CLS, or the masked mean) of last_hidden, then
  L2-normalised when modules.json has a Normalize module.

The same wrapper module is the fp32 reference of the fidelity gate, so the reference and the graph
cannot drift apart; the tiny-model test checks it against FlagEmbedding itself.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from handler.engine.manifest import TensorSpec
from model_build.errors import SourceError
from model_build.progress import Progress
from model_build.source import Recipe

DEFAULT_OPSET = 17  # native LayerNormalization; ORT's bert optimizer still fuses Attention on it
EXTERNAL_DATA = "model.onnx_data"
# Models whose position ids start after the padding index (RoBERTa family): usable positions are
# max_position_embeddings - (pad_token_id + 1).
_OFFSET_POSITION_MODELS = {"xlm-roberta", "roberta", "camembert", "mpnet", "xlm-roberta-xl"}

Pooling = Literal["cls", "mean"]


class BgeM3Module(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, colbert: torch.nn.Linear, sparse: torch.nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.colbert_linear = colbert
        self.sparse_linear = sparse

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden: torch.Tensor = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        dense = F.normalize(hidden[:, 0], p=2.0, dim=-1)
        sparse = torch.relu(self.sparse_linear(hidden)).squeeze(-1)
        mask = attention_mask[:, 1:, None].to(hidden.dtype)
        colbert = F.normalize(self.colbert_linear(hidden[:, 1:]) * mask, p=2.0, dim=-1)
        return dense, sparse, colbert


class DenseModule(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module, pooling: Pooling, normalize: bool):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden: torch.Tensor = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask
        ).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            # sentence-transformers' masked mean (clamped so an all-padding row cannot divide by 0)
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        return pooled


@dataclass
class LoadedModel:
    recipe: Recipe
    module: torch.nn.Module  # the wrapper: reference and export
    encoder: torch.nn.Module  # the transformers encoder inside it (SmoothQuant works on this)
    output_names: tuple[str, ...]
    dims: int
    colbert_dims: int | None
    pooling: Pooling
    normalize: bool
    vocab_size: int
    model_type: str
    max_positions: int  # the longest input (specials included) the position table allows
    num_heads: int  # attention heads, for the MultiHeadAttention rewrite
    default_max_length: int
    heads: dict[str, Any]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot be read as JSON ({exc})") from exc


def _load_encoder(source_dir: Path) -> torch.nn.Module:
    import transformers
    from transformers import AutoModel

    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    transformers.utils.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    try:
        # Eager attention: a plain MatMul/Softmax pattern that exports everywhere and that ORT's
        # transformer optimizer can fuse into its Attention op later.
        model, info = AutoModel.from_pretrained(
            str(source_dir),
            attn_implementation="eager",
            dtype=torch.float32,
            output_loading_info=True,
            local_files_only=True,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise SourceError(f"{source_dir}: cannot load the model weights ({exc})") from exc
    missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith("pooler."))
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        )
        raise SourceError(f"{source_dir}: the weights do not match config.json, missing {shown}")
    model.eval()
    return model  # type: ignore[no-any-return]


def _load_linear(path: Path) -> torch.nn.Linear:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        weight = state["weight"]
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state)
        linear.load_state_dict(state)
    except Exception as exc:  # pickle, key and shape errors all mean the same here
        raise SourceError(f"{path}: not a torch.nn.Linear state dict ({exc})") from exc
    return linear.eval()


def _max_positions(config: dict[str, Any]) -> int:
    positions = int(config.get("max_position_embeddings", 512))
    if config.get("model_type") in _OFFSET_POSITION_MODELS:
        positions -= int(config.get("pad_token_id", 1)) + 1
    return positions


def _dense_settings(source_dir: Path) -> tuple[Pooling, bool, str]:
    modules = _read_json(source_dir / "modules.json")
    if not isinstance(modules, list):
        raise SourceError(f"{source_dir / 'modules.json'}: expected a list of modules")
    pooling_dir: str | None = None
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith(".Pooling"):
            pooling_dir = str(module.get("path", ""))
        elif kind.endswith(".Normalize"):
            normalize = True
        elif not kind.endswith(".Transformer"):
            raise SourceError(
                f"{source_dir / 'modules.json'}: module {kind!r} is not supported by the dense "
                "recipe (Transformer, Pooling and Normalize are)"
            )
    if pooling_dir is None:
        raise SourceError(f"{source_dir / 'modules.json'}: no Pooling module")
    pooling_file = f"{pooling_dir}/config.json" if pooling_dir else "config.json"
    path = source_dir / pooling_file
    if not path.is_file():
        raise SourceError(f"{source_dir}: missing {pooling_file} (named by modules.json)")
    config = _read_json(path)
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    if modes == ["pooling_mode_cls_token"]:
        return "cls", normalize, pooling_file
    if modes == ["pooling_mode_mean_tokens"]:
        return "mean", normalize, pooling_file
    raise SourceError(
        f"{path}: pooling {modes or 'none'} is not supported (CLS or mean tokens only)"
    )


def load_model(source_dir: Path, recipe: Recipe, progress: Progress) -> LoadedModel:
    config = _read_json(source_dir / "config.json")
    encoder = _load_encoder(source_dir)
    hidden = int(config["hidden_size"])
    vocab_size = int(config["vocab_size"])
    max_positions = _max_positions(config)
    model_type = str(config.get("model_type", "?"))
    num_heads = int(config["num_attention_heads"])
    if recipe == "bge-m3":
        colbert = _load_linear(source_dir / "colbert_linear.pt")
        sparse = _load_linear(source_dir / "sparse_linear.pt")
        if (
            colbert.in_features != hidden
            or sparse.in_features != hidden
            or sparse.out_features != 1
        ):
            raise SourceError(
                f"{source_dir}: head shapes do not fit hidden_size {hidden} "
                f"(colbert {tuple(colbert.weight.shape)}, sparse {tuple(sparse.weight.shape)})"
            )
        module: torch.nn.Module = BgeM3Module(encoder, colbert, sparse).eval()
        loaded = LoadedModel(
            recipe=recipe,
            module=module,
            encoder=encoder,
            output_names=("dense", "sparse", "colbert"),
            dims=hidden,
            colbert_dims=colbert.out_features,
            pooling="cls",
            normalize=True,
            vocab_size=vocab_size,
            model_type=model_type,
            max_positions=max_positions,
            num_heads=num_heads,
            default_max_length=min(8192, max_positions),
            heads={"colbert_linear": list(colbert.weight.shape), "sparse_linear": [1, hidden]},
        )
    else:
        pooling, normalize, pooling_file = _dense_settings(source_dir)
        st_config = source_dir / "sentence_bert_config.json"
        default_max = max_positions
        if st_config.is_file():
            seq = _read_json(st_config).get("max_seq_length")
            if isinstance(seq, int) and seq > 0:
                default_max = min(seq, max_positions)
        module = DenseModule(encoder, pooling, normalize).eval()
        loaded = LoadedModel(
            recipe=recipe,
            module=module,
            encoder=encoder,
            output_names=("dense",),
            dims=hidden,
            colbert_dims=None,
            pooling=pooling,
            normalize=normalize,
            vocab_size=vocab_size,
            model_type=model_type,
            max_positions=max_positions,
            num_heads=num_heads,
            default_max_length=default_max,
            heads={"pooling_config": pooling_file},
        )
    params = sum(p.numel() for p in loaded.module.parameters())
    progress.log(
        "load",
        f"{type(encoder).__name__} ({model_type}), hidden {hidden}, "
        f"{int(config.get('num_hidden_layers', 0))} layers, {params / 1e6:.1f}M parameters, "
        f"pooling {loaded.pooling}, normalize {loaded.normalize}",
    )
    return loaded


def output_specs(model: LoadedModel) -> tuple[TensorSpec, ...]:
    specs = [TensorSpec(name="dense", dtype="float32", shape=("batch", model.dims))]
    if model.recipe == "bge-m3":
        assert model.colbert_dims is not None
        specs.append(TensorSpec(name="sparse", dtype="float32", shape=("batch", "sequence")))
        specs.append(
            TensorSpec(
                name="colbert", dtype="float32", shape=("batch", "sequence-1", model.colbert_dims)
            )
        )
    return tuple(specs)


INPUT_SPECS: tuple[TensorSpec, ...] = (
    TensorSpec(name="input_ids", dtype="int64", shape=("batch", "sequence")),
    TensorSpec(name="attention_mask", dtype="int64", shape=("batch", "sequence")),
)


def export_onnx(
    model: LoadedModel,
    out_path: Path,
    *,
    work_dir: Path,
    opset: int,
    special_tokens: dict[str, int],
    progress: Progress,
) -> None:
    """Export the wrapper to `out_path` with its weights in `model.onnx_data` beside it."""
    import onnx

    raw_dir = work_dir / "torch-export"
    raw_dir.mkdir(parents=True, exist_ok=True)
    raw_path = raw_dir / "model.onnx"
    # Trace on a padded batch of two so the attention-mask path is in the graph; batch and
    # sequence are dynamic axes, so nothing is specialised to these shapes.
    cls, sep, pad = special_tokens["cls"], special_tokens["sep"], special_tokens["pad"]
    body = [5, 6, 7, 8, 9, 10]
    ids = torch.tensor([[cls, *body, sep], [cls, *body[:3], sep, pad, pad, pad]], dtype=torch.int64)
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor([[8], [5]])).to(torch.int64)
    ids = ids.clamp(max=model.vocab_size - 1)
    dynamic_axes: dict[str, dict[int, str]] = {
        "input_ids": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "dense": {0: "batch"},
    }
    if model.recipe == "bge-m3":
        dynamic_axes["sparse"] = {0: "batch", 1: "sequence"}
        dynamic_axes["colbert"] = {0: "batch", 1: "sequence-1"}
    progress.log(
        "export", f"tracing {type(model.encoder).__name__} (opset {opset}, eager attention)"
    )
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy TorchScript exporter warns about itself and about shape-dependent Python
        # branches in transformers that are constant for any input (kv_length == mask length).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.module,
            (ids, mask),
            str(raw_path),
            input_names=["input_ids", "attention_mask"],
            output_names=list(model.output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    progress.log("export", "writing the graph with external data")
    proto = onnx.load(str(raw_path), load_external_data=True)
    _set_output_shapes(proto, output_specs(model))
    proto.doc_string = f"model_build export of a {model.recipe} recipe ({model.model_type})"
    save_with_external_data(proto, out_path)
    onnx.checker.check_model(str(out_path))
    for leftover in raw_dir.iterdir():
        leftover.unlink()
    raw_dir.rmdir()


def _set_output_shapes(proto: Any, specs: tuple[TensorSpec, ...]) -> None:
    """Name the output axes as the manifest does ("batch", "sequence", "sequence-1", ints);
    the exporter leaves generated names such as 'Divdense_dim_1' on the fixed ones."""
    by_name = {spec.name: spec for spec in specs}
    for output in proto.graph.output:
        spec = by_name[output.name]
        dims = output.type.tensor_type.shape.dim
        for dim, value in zip(dims, spec.shape, strict=True):
            if isinstance(value, int):
                dim.ClearField("dim_param")
                dim.dim_value = value
            else:
                dim.ClearField("dim_value")
                dim.dim_param = value


def load_with_shapes(path: Path) -> Any:
    """The graph at `path` with its external data and onnx's inferred shapes as value_info.
    Shape inference goes through the path API, which works above 2 GB, where the in-memory one
    cannot serialise the model."""
    import onnx

    inferred = path.parent / "inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred))
    proto = onnx.load(str(inferred), load_external_data=False)
    onnx.load_external_data_for_model(proto, str(path.parent))
    inferred.unlink()
    return proto


def save_with_external_data(proto: Any, path: Path) -> None:
    """One graph file and one `model.onnx_data` beside it (required above 2 GB; mmapped at run)."""
    import onnx

    data = path.parent / EXTERNAL_DATA
    if data.exists():
        data.unlink()
    onnx.save_model(
        proto,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=EXTERNAL_DATA,
        size_threshold=1024,
    )
