"""Model shapes to plan for without their weights: published presets, or a Hugging Face ``config.json``.

A ``ModelSpec`` is the shape of a decoder-only transformer: its family
(``gpt``: LayerNorm, GELU MLP, learned positions, LM head tied to the
embedding, as GPT-2/GPT-3; ``opt``: the same with ReLU and an untied head;
``llama``: RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention,
untied head), layers, hidden size, heads, MLP width and vocabulary.

``block(spec)`` and ``head(spec)`` build one decoder layer and the final
norm + LM head + loss as ordinary modules, so a planner can trace them on the
``meta`` device: a 96-layer model is one block repeated (``wholestep/``).
They compute what the families compute (the loss in fp32, as Hugging Face
does); they are not loaders of real checkpoints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

FAMILIES = ("gpt", "opt", "llama")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    kv_heads: int | None = None  # grouped-query attention (LLaMA-2 70B): fewer key/value heads
    max_seq: int = 2048
    source: str = ""
    # a mixture of experts (LLaMA family: Mixtral, Qwen-MoE): ``experts`` gated MLPs of ``ffn``
    # each in every block, ``experts_per_token`` of them run per token (0: a dense model), and
    # a shared expert every token runs, of ``shared_ffn`` (0: none) with a sigmoid gate
    experts: int = 0
    experts_per_token: int = 0
    shared_ffn: int = 0
    qkv_bias: bool = False  # the llama family with biases on q, k and v (Qwen2)
    # the LM head is the embedding's weight (``tie_word_embeddings``); None: the family's way
    # (GPT's tied, OPT's and LLaMA's not)
    tie_embeddings: bool | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; families: {', '.join(FAMILIES)}")
        if self.hidden % self.heads:
            raise ValueError(f"{self.name}: hidden size {self.hidden} is not a multiple of {self.heads} heads")
        if self.experts and (self.family != "llama" or not 0 < self.experts_per_token <= self.experts):
            raise ValueError(f"{self.name}: a mixture of experts needs the llama family and 1 to {self.experts} "
                             f"experts per token, got {self.family!r} and {self.experts_per_token}")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_kv(self) -> int:
        return self.kv_heads or self.heads

    @property
    def tied(self) -> bool:
        return self.family == "gpt" if self.tie_embeddings is None else self.tie_embeddings

    def mlp_params(self, active: bool = False) -> int:
        """A block's MLP: the dense one, or the router, the experts (``active``: only those a token
        runs) and the shared expert with its gate."""
        h, f = self.hidden, self.ffn
        if not self.experts:
            return 3 * h * f if self.family == "llama" else 2 * h * f + f + h
        shared = 3 * h * self.shared_ffn + h if self.shared_ffn else 0
        return h * self.experts + (self.experts_per_token if active else self.experts) * 3 * h * f + shared

    def block_params(self, active: bool = False) -> int:
        h, kv = self.hidden, self.n_kv * self.head_dim
        if self.family == "llama":
            bias = h + 2 * kv if self.qkv_bias else 0
            return h * h + 2 * h * kv + h * h + bias + self.mlp_params(active) + 2 * h
        # q, k, v, out with biases; two LayerNorms; MLP with biases
        return 4 * h * h + 4 * h + 4 * h + self.mlp_params(active)

    def embedding_params(self) -> int:
        positions = self.max_seq * self.hidden if self.family in ("gpt", "opt") else 0
        return self.vocab * self.hidden + positions

    def head_params(self) -> int:
        norm = self.hidden if self.family == "llama" else 2 * self.hidden
        return norm + (0 if self.tied else self.vocab * self.hidden)

    def parameters(self) -> int:
        return self.layers * self.block_params() + self.embedding_params() + self.head_params()

    def active_parameters(self) -> int:
        """The parameters a token runs through (a mixture of experts: its experts only)."""
        return self.layers * self.block_params(active=True) + self.embedding_params() + self.head_params()


def _gpt3(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(name, "gpt", layers, hidden, heads, 4 * hidden, 50257, max_seq=2048,
                     source="GPT-3 paper (Brown et al. 2020), table 2.1")


PRESETS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        _gpt3("gpt3-1.3b", 24, 2048, 16),
        _gpt3("gpt3-2.7b", 32, 2560, 32),
        _gpt3("gpt3-6.7b", 32, 4096, 32),
        # the paper lists d_model 5140 with 40 heads of 128; LoHan and Megatron use 5120
        _gpt3("gpt3-13b", 40, 5120, 40),
        _gpt3("gpt3-175b", 96, 12288, 96),
        ModelSpec("llama2-7b", "llama", 32, 4096, 32, 11008, 32000, max_seq=4096, source="Llama 2 paper / HF config"),
        ModelSpec("llama2-13b", "llama", 40, 5120, 40, 13824, 32000, max_seq=4096, source="Llama 2 paper / HF config"),
        ModelSpec("llama2-70b", "llama", 80, 8192, 64, 28672, 32000, kv_heads=8, max_seq=4096,
                  source="Llama 2 paper / HF config"),
        ModelSpec("opt-13b", "opt", 40, 5120, 40, 20480, 50272, source="OPT paper (Zhang et al. 2022), table 1"),
        ModelSpec("opt-30b", "opt", 48, 7168, 56, 28672, 50272, source="OPT paper (Zhang et al. 2022), table 1"),
        # small enough to plan in a test
        ModelSpec("tiny-gpt", "gpt", 4, 256, 4, 1024, 1000, max_seq=512, source="test model"),
        ModelSpec("tiny-llama", "llama", 4, 256, 4, 688, 1000, kv_heads=2, max_seq=512, source="test model"),
    )
}


def model_spec(name_or_path: str) -> ModelSpec:
    """A preset by name, or the shape in a Hugging Face ``config.json`` (a file or a folder holding one)."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        import difflib

        close = difflib.get_close_matches(name_or_path, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model {name_or_path!r}: not a preset and not a config.json file.{hint} "
                         f"Presets: {', '.join(p for p in PRESETS if not p.startswith('tiny'))}")
    return from_hf_config(json.loads(path.read_text()), name=path.parent.name or path.stem)


QKV_BIAS = ("qwen2", "qwen2_moe")  # model types whose attention has biases on q, k and v

# fields of mixture-of-experts configs (Mixtral, Qwen-MoE, DeepSeek, OLMoE, GPT-OSS, ...)
MOE_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size",
              "num_experts_per_tok")


def from_hf_config(cfg: dict, name: str = "model") -> ModelSpec:
    """The shape of a Hugging Face config (LLaMA-like, GPT-2, OPT, GPT-NeoX-like fields; Mixtral
    and Qwen-MoE mixtures of experts). A mixture of experts of another layout is refused: planned
    as a dense model it would be several times smaller than the model it describes."""
    mt = cfg.get("model_type", "")
    moe = {k: cfg[k] for k in MOE_FIELDS if cfg.get(k)}
    if moe:
        return _moe_spec(cfg, name, moe)
    if mt in ("gpt2", "gpt_neo", "gptj", "gpt_bigcode"):
        h = cfg.get("n_embd") or cfg["hidden_size"]
        return ModelSpec(name, "gpt", cfg.get("n_layer") or cfg["num_hidden_layers"], h,
                         cfg.get("n_head") or cfg["num_attention_heads"], cfg.get("n_inner") or 4 * h,
                         cfg["vocab_size"], max_seq=cfg.get("n_positions", 2048), source=f"config.json ({mt})")
    if mt == "opt":
        return ModelSpec(name, "opt", cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                         cfg["ffn_dim"], cfg["vocab_size"], max_seq=cfg.get("max_position_embeddings", 2048),
                         source="config.json (opt)")
    if "intermediate_size" in cfg and "num_attention_heads" in cfg:
        # LLaMA, Mistral, Qwen2 and the like: RMSNorm, rotary, gated MLP
        _head_dim_of(cfg, mt)
        return ModelSpec(name, "llama", cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
                         cfg["intermediate_size"], cfg["vocab_size"], kv_heads=cfg.get("num_key_value_heads"),
                         max_seq=cfg.get("max_position_embeddings", 4096), qkv_bias=mt in QKV_BIAS,
                         tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                         source=f"config.json ({mt or 'llama-like'})")
    raise ValueError(f"config.json of model_type {mt!r}: cannot read its shape; supported: LLaMA-like "
                     "(hidden_size, intermediate_size, num_attention_heads), gpt2, opt")


def _odd_head_dim(cfg: dict) -> bool:
    """Attention heads other than hidden_size / num_attention_heads wide (Qwen3's, Gemma's
    ``head_dim``), which lohan plan does not model."""
    return bool(cfg.get("head_dim")) and cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]


def _head_dim_of(cfg: dict, mt: str) -> None:
    """A LLaMA-like config with ``_odd_head_dim`` is refused: its attention would be planned
    at another size."""
    if _odd_head_dim(cfg):
        raise ValueError(f"config.json of model_type {mt!r} has head_dim={cfg['head_dim']}, not hidden_size / "
                         f"num_attention_heads ({cfg['hidden_size']} / {cfg['num_attention_heads']}): lohan plan "
                         "models attention heads of hidden_size / num_attention_heads only. Plan it by compiling "
                         "the model itself with torch.compile(backend='lohan')")


def _moe_spec(cfg: dict, name: str, moe: dict) -> ModelSpec:
    """Mixtral (``num_local_experts``, experts of ``intermediate_size``) and Qwen-MoE
    (``num_experts``, experts of ``moe_intermediate_size``, a gated shared expert of
    ``shared_expert_intermediate_size``), every layer sparse; anything else is refused with
    what is not understood."""
    mt = cfg.get("model_type", "")
    fields = ", ".join(f"{k}={v}" for k, v in moe.items())

    def refuse(why: str) -> ValueError:
        return ValueError(f"config.json of model_type {mt!r} describes a mixture of experts ({fields}), {why}: "
                          "lohan plan would plan another model than this one. Plan it by compiling the model "
                          "itself with torch.compile(backend='lohan'), which traces the experts it runs")

    if mt not in ("mixtral", "qwen2_moe"):
        raise refuse("of a layout it does not model (it models mixtral's and qwen2_moe's)")
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    per_token = cfg.get("num_experts_per_tok")
    unknown = [k for k in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace") if cfg.get(k)]
    if unknown:
        raise refuse(f"with {', '.join(unknown)}, a layout it does not model (Mixtral's and Qwen-MoE's are)")
    if not experts or not per_token:
        raise refuse("without both the number of experts and num_experts_per_tok")
    if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
        raise refuse("with dense layers among the sparse ones (mlp_only_layers, decoder_sparse_step), "
                     "a layout it does not model")
    if "num_attention_heads" not in cfg or "hidden_size" not in cfg:
        raise refuse("without hidden_size and num_attention_heads")
    if _odd_head_dim(cfg):
        raise refuse(f"with head_dim={cfg['head_dim']}, not hidden_size / num_attention_heads")
    ffn = cfg.get("moe_intermediate_size") or cfg.get("intermediate_size")
    return ModelSpec(name, "llama", cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"], ffn,
                     cfg["vocab_size"], kv_heads=cfg.get("num_key_value_heads"),
                     max_seq=cfg.get("max_position_embeddings", 4096), experts=experts, experts_per_token=per_token,
                     shared_ffn=cfg.get("shared_expert_intermediate_size") or 0, qkv_bias=mt in QKV_BIAS,
                     tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                     source=f"config.json ({mt}, {experts} experts, {per_token} per token)")


def small(spec: ModelSpec, layers: int) -> ModelSpec:
    return replace(spec, layers=layers, name=f"{spec.name}[{layers} layers]")


# -- modules -----------------------------------------------------------------------


class _RMSNorm(nn.Module):
    def __init__(self, h: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)
        return self.weight * xf.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    """One decoder layer of ``spec``'s family: hidden states in, hidden states out."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        h, f, d = spec.hidden, spec.ffn, spec.head_dim
        llama = spec.family == "llama"
        self.norm1 = _RMSNorm(h) if llama else nn.LayerNorm(h)
        self.norm2 = _RMSNorm(h) if llama else nn.LayerNorm(h)
        qkv_bias = not llama or spec.qkv_bias
        self.q = nn.Linear(h, h, bias=qkv_bias)
        self.k = nn.Linear(h, spec.n_kv * d, bias=qkv_bias)
        self.v = nn.Linear(h, spec.n_kv * d, bias=qkv_bias)
        self.o = nn.Linear(h, h, bias=not llama)
        if spec.experts:
            self.router = nn.Linear(h, spec.experts, bias=False)
            self.experts = nn.ModuleList(_GatedMLP(h, f) for _ in range(spec.experts))
            if spec.shared_ffn:
                self.shared = _GatedMLP(h, spec.shared_ffn)
                self.shared_gate = nn.Linear(h, 1, bias=False)
            return
        if llama:
            self.gate = nn.Linear(h, f, bias=False)
        self.up = nn.Linear(h, f, bias=not llama)
        self.down = nn.Linear(f, h, bias=not llama)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        a = self.norm1(x)
        q = self.q(a).view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = self.k(a).view(b, t, s.n_kv, s.head_dim).transpose(1, 2)
        v = self.v(a).view(b, t, s.n_kv, s.head_dim).transpose(1, 2)
        if s.family == "llama":
            pos = torch.arange(t, device=x.device, dtype=torch.float32)
            inv = 1.0 / (10000.0 ** (torch.arange(0, s.head_dim, 2, device=x.device, dtype=torch.float32) / s.head_dim))
            ang = torch.outer(pos, inv)
            ang = torch.cat((ang, ang), dim=-1)
            cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=s.n_kv != s.heads)
        x = x + self.o(att.transpose(1, 2).reshape(b, t, s.hidden))
        m = self.norm2(x)
        if s.experts:
            return x + self._experts(m.reshape(b * t, s.hidden)).view(b, t, s.hidden)
        if s.family == "llama":
            m = F.silu(self.gate(m)) * self.up(m)
        elif s.family == "gpt":
            m = F.gelu(self.up(m), approximate="tanh")
        else:
            m = F.relu(self.up(m))
        return x + self.down(m)


    def _experts(self, m: torch.Tensor) -> torch.Tensor:
        """The routed MLP with the tokens spread evenly: each expert runs ``tokens x k / E`` of
        them (the expected share; the router's choice is data the planner does not have), so its
        weights are read and updated and its activations saved as in training."""
        s = self.spec
        n = m.shape[0]
        weights, _ = torch.topk(torch.softmax(self.router(m).float(), dim=-1), s.experts_per_token, dim=-1)
        share = max(1, -(-n * s.experts_per_token // s.experts))
        out = torch.zeros_like(m)
        for e, expert in enumerate(self.experts):
            rows = torch.arange(e * share, (e + 1) * share, device=m.device) % n
            picked = m.index_select(0, rows)
            scale = weights.index_select(0, rows)[:, e % s.experts_per_token, None].to(m.dtype)
            out = out.index_add(0, rows, expert(picked) * scale)
        if s.shared_ffn:
            out = out + torch.sigmoid(self.shared_gate(m)) * self.shared(m)
        return out


class _GatedMLP(nn.Module):
    def __init__(self, h: int, f: int):
        super().__init__()
        self.gate = nn.Linear(h, f, bias=False)
        self.up = nn.Linear(h, f, bias=False)
        self.down = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Head(nn.Module):
    """Final norm, LM head and cross-entropy (in fp32): hidden states and labels in, the loss out."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.norm = _RMSNorm(spec.hidden) if spec.family == "llama" else nn.LayerNorm(spec.hidden)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab, bias=False)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(x)).float()
        # cross-entropy written out: the fused op has no autograd on the meta device, where
        # planners trace (same math, same fp32 logits saved)
        picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return (logits.logsumexp(-1) - picked).mean()


class Model(nn.Module):
    """The whole model (embedding, ``layers`` blocks, head): to check the block-repeated plan
    against tracing everything, on models small enough for that."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed = nn.Embedding(spec.vocab, spec.hidden)
        self.pos = nn.Embedding(spec.max_seq, spec.hidden) if spec.family in ("gpt", "opt") else None
        self.blocks = nn.ModuleList(Block(spec) for _ in range(spec.layers))
        self.head = Head(spec)
        if spec.tied:
            self.head.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(x, labels)


def model_flops_per_token(spec: ModelSpec) -> float:
    """The usual convention: 6 x parameters FLOPs per token for forward + backward (a mixture of
    experts: the parameters a token runs through)."""
    return 6.0 * spec.active_parameters()


def check_seq(spec: ModelSpec, seq: int) -> None:
    if seq > spec.max_seq and spec.family != "llama":
        raise ValueError(f"{spec.name}: sequence {seq} is longer than its {spec.max_seq} learned positions")
    if seq <= 0 or not math.isfinite(seq):
        raise ValueError(f"sequence length must be positive, got {seq}")
