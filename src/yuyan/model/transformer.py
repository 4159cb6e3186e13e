"""The yuyan transformer: GPT-2 and Llama families in one readable file.

A decoder-only transformer whose differences between families are a handful of explicit switches in
`ModelConfig` (norm, positions, MLP, tied embeddings, `n_kv_head`), beside the switches of the small-model
speedrun recipes (QK-norm, the ReLU² MLP, soft-capped logits, zero-initialised residual projections). Parameter names follow Hugging Face's
Llama layout (`embed_tokens`, `layers.i.self_attn.q_proj`, `mlp.gate_proj`, `norm`, `lm_head`) so that
import/export is a key table. The KV cache is a small object owned by the caller and passed into
`forward`; the model writes the new keys/values into it but never advances it (the engine does). Named
shapes live in presets.py, parameter and FLOP counts in flops.py.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from yuyan.model.kv_cache import KVCache
from yuyan.model.loss import linear_cross_entropy, tied_lookup

FFNS = ("gelu_mlp", "swiglu", "relu2_mlp", "geglu")
NORM_PLACEMENTS = ("pre", "post", "sandwich")


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    block_size: int = 256  # longest sequence (positions) the model is trained for
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: = n_head (MHA); 1: MQA; in between: GQA
    d_model: int = 128
    d_ff: int | None = None  # None: 4*d_model (gelu_mlp) or the Llama 8/3 rule rounded to 64 (swiglu)
    head_dim: int | None = None  # None: d_model // n_head
    ffn: str = (
        "gelu_mlp"  # gelu_mlp | swiglu | relu2_mlp (up, relu, square, down) | geglu (Gemma's gated tanh GELU)
    )
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    pos: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    # Llama-3 style {"rope_type": "llama3", "factor": ..., ...}, or {"rope_type": "linear", "factor": f}
    # (positions divided by f: Gemma 3's global layers); never applied to the local layers' local_rope_theta
    rope_scaling: dict | None = None
    bias: bool = True  # biases in linear layers and LayerNorm
    qkv_bias: bool | None = None  # None: = bias (Qwen2 has qkv bias without other biases)
    tie_embeddings: bool = True
    dropout: float = 0.0
    qk_norm: bool = False  # RMSNorm over each head's q and k before RoPE (Qwen3's q_norm / k_norm)
    logit_softcap: float | None = None  # logits = cap * tanh(logits / cap) (Gemma 2, modded-nanogpt)
    zero_init_residual: bool = False  # o_proj and down_proj start at zero: each block starts as the identity
    # --- the switches of other open families (import/export in hf.py), all off by default
    # where the norms sit: pre (GPT-2, Llama: norm -> sublayer -> add), post (OLMo 2: sublayer -> norm -> add),
    # sandwich (Gemma 2/3: norm -> sublayer -> norm -> add)
    norm_placement: str = "pre"
    qk_norm_scope: str = (
        "head"  # qk_norm over each head (Qwen3, Gemma 3) or the whole q/k projection (OLMo 2)
    )
    norm_offset: bool = False  # RMSNorm scales by (1 + weight), its weight starting at 0 (Gemma)
    embed_scale: bool = False  # token embeddings times sqrt(d_model) (Gemma)
    attn_scale: float | None = (
        None  # scores divided by sqrt(attn_scale); None: head_dim (Gemma's query_pre_attn_scalar)
    )
    attn_softcap: float | None = None  # attention scores = cap * tanh(scores / cap) (Gemma 2)
    sliding_window: int | None = (
        None  # local layers see the last `sliding_window` positions (themselves included)
    )
    local_layers: list[int] | None = None  # which layers are local (None with a window: all of them)
    local_rope_theta: float | None = None  # RoPE base of the local layers (Gemma 3); None: rope_theta
    nope_layers: list[int] | None = None  # layers without RoPE (SmolLM3)

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_head
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        if self.d_ff is None:
            if self.ffn == "swiglu":
                self.d_ff = 64 * math.ceil(int(8 * self.d_model / 3) / 64)
            else:
                self.d_ff = 4 * self.d_model
        sizes = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim")
        bad = [
            f"{k}={v!r}"
            for k in sizes
            if isinstance(v := getattr(self, k), bool) or not isinstance(v, numbers.Integral) or v < 1
        ]
        if bad:  # checked first: the rules below do arithmetic on these
            raise ValueError(f"invalid model config: sizes must be positive integers, got {', '.join(bad)}")
        self._check_floats()
        checks = [
            (self.ffn in FFNS, f"ffn must be one of {', '.join(FFNS)}, got {self.ffn!r}"),
            (self.norm in ("layernorm", "rmsnorm"), f"norm must be layernorm or rmsnorm, got {self.norm!r}"),
            (self.pos in ("learned", "rope"), f"pos must be learned or rope, got {self.pos!r}"),
            (
                self.n_head % self.n_kv_head == 0,
                f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})",
            ),
            (self.pos != "rope" or self.head_dim % 2 == 0, "rope needs an even head_dim"),
            (
                self.norm_placement in NORM_PLACEMENTS,
                f"norm_placement must be one of {', '.join(NORM_PLACEMENTS)}, got {self.norm_placement!r}",
            ),
            (
                self.qk_norm_scope in ("head", "proj"),
                f"qk_norm_scope must be head or proj, got {self.qk_norm_scope!r}",
            ),
            (not self.norm_offset or self.norm == "rmsnorm", "norm_offset needs norm = rmsnorm"),
            (
                self.sliding_window is None
                or (isinstance(self.sliding_window, int) and not isinstance(self.sliding_window, bool))
                and self.sliding_window >= 1,
                f"sliding_window must be a positive integer or None, got {self.sliding_window!r}",
            ),
            (
                self.local_layers is None or self.sliding_window is not None,
                "local_layers needs a sliding_window",
            ),
        ]
        for name in ("local_layers", "nope_layers"):
            v = getattr(self, name)
            if v is not None and not (
                isinstance(v, list | tuple)
                and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.n_layer for i in v)
            ):
                checks.append(
                    (False, f"{name} must be a list of layer indices in [0, {self.n_layer}), got {v!r}")
                )
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid model config: {msg}")

    def _check_floats(self) -> None:
        """Finite, in-range floats: a config.json with NaN or a negative epsilon is refused by field name."""
        checks = [
            ("dropout", self.dropout, lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
            ("norm_eps", self.norm_eps, lambda v: v > 0, "> 0"),
            ("rope_theta", self.rope_theta, lambda v: v > 0, "> 0"),
        ]
        for name in ("logit_softcap", "attn_softcap", "attn_scale", "local_rope_theta"):
            if getattr(self, name) is not None:
                checks.append((name, getattr(self, name), lambda v: v > 0, "> 0 (or None: off)"))
        for name, v, ok, rule in checks:
            real = isinstance(v, numbers.Real) and not isinstance(v, bool)
            if not (real and math.isfinite(v) and ok(v)):
                raise ValueError(f"invalid model config: {name} must be a finite number {rule}, got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def is_local(self, layer: int) -> bool:
        """Does this layer attend through the sliding window?"""
        return self.sliding_window is not None and (self.local_layers is None or layer in self.local_layers)

    def uses_rope(self, layer: int) -> bool:
        return self.pos == "rope" and not (self.nope_layers and layer in self.nope_layers)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"format", "version", "preset"}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def rope_inv_freq(config: ModelConfig, theta: float | None = None) -> torch.Tensor:
    """RoPE's inverse frequencies (head_dim / 2,) for base `theta` (default rope_theta, rescaled as
    `rope_scaling` says; a given theta, the local layers', is never rescaled)."""
    dim = config.head_dim
    rs = config.rope_scaling if theta is None else None
    theta = config.rope_theta if theta is None else theta
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rs and rs.get("rope_type", rs.get("type")) == "linear":
        return inv_freq / rs["factor"]
    if rs and rs.get("rope_type", rs.get("type")) == "llama3":
        # Llama 3.1 frequency rescaling (same rule as HF's _compute_llama3_parameters)
        factor, low, high = rs["factor"], rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
        old_len = rs.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        mid = (1 - smooth) * scaled / factor + smooth * scaled
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
        raise ValueError(f"unsupported rope_scaling {rs}; supported: default, linear, llama3")
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Norm(nn.Module):
    """config.norm over d_model; `kind`/`dim` override it (QK-norm is an RMSNorm over head_dim)."""

    def __init__(self, config: ModelConfig, kind: str | None = None, dim: int | None = None):
        super().__init__()
        self.kind, self.eps = kind or config.norm, config.norm_eps
        self.offset = config.norm_offset  # Gemma: (1 + weight), the weight starting at 0
        self.weight = nn.Parameter(
            torch.zeros(dim or config.d_model) if self.offset else torch.ones(dim or config.d_model)
        )
        has_bias = self.kind == "layernorm" and config.bias
        self.bias = nn.Parameter(torch.zeros(config.d_model)) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "layernorm":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        # RMSNorm in float32 like HF Llama, then back to the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # as Gemma: scaled in float32, then cast
            return (xf * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    # Set from outside (yuyan.model.precision.upcast_attention) where a timed kernel says so: bf16 q/k/v go
    # through SDPA in float32. CPU flash attention in bf16 ran 3x slower than in fp32 at head_dim 32.
    sdpa_fp32: bool = False

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = (
            layer,
            config.n_head,
            config.n_kv_head,
            config.head_dim,
        )
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.d_model, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.d_model, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.n_head * config.head_dim, config.d_model, bias=config.bias)
        self.o_proj.residual = True
        if config.qk_norm:  # per head, shared across heads (Qwen3), or over the whole projection (OLMo 2)
            per_head = config.qk_norm_scope == "head"
            self.q_norm = Norm(config, "rmsnorm", config.head_dim * (1 if per_head else config.n_head))
            self.k_norm = Norm(config, "rmsnorm", config.head_dim * (1 if per_head else config.n_kv_head))
        self.qk_norm = config.qk_norm and config.qk_norm_scope == "head"
        self.proj_norm = config.qk_norm and config.qk_norm_scope == "proj"
        self.scale = (config.attn_scale or config.head_dim) ** -0.5
        self.softcap = config.attn_softcap
        self.window = config.sliding_window if config.is_local(layer) else None
        self.rope = config.uses_rope(layer)

    def forward(
        self, x, pos, rope, cache: KVCache | None, mask: torch.Tensor | None, attn_weights: list | None
    ):
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.proj_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope  # (B, 1, T, D)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v, pos, mask.shape[-1])  # (B, Hkv, S, D)
        rep = self.n_head // self.n_kv_head
        if attn_weights is not None or self.softcap is not None:  # explicit path (SDPA cannot soft-cap)
            kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            scores = (q @ kr.transpose(-2, -1)) * self.scale
            if self.softcap is not None:
                scores = self.softcap * torch.tanh(scores / self.softcap)
            if mask is None:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
            att = scores.softmax(-1)
            if attn_weights is not None:
                attn_weights.append(att.detach())
            y = F.dropout(att, self.dropout, self.training) @ vr
        elif self.sdpa_fp32 and v.dtype == torch.bfloat16:  # q, k may be float32 from RoPE's tables
            with torch.autocast(x.device.type, enabled=False):
                y = self.sdpa(q.float(), k.float(), v.float(), mask, rep).to(v.dtype)
        else:
            y = self.sdpa(q, k, v, mask, rep)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.o_proj(y)

    def sdpa(self, q, k, v, mask: torch.Tensor | None, rep: int) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
            enable_gqa=rep > 1,
        )


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ffn = config.ffn
        self.swiglu = config.ffn in ("swiglu", "geglu")  # gated: down(act(gate(x)) * up(x))
        if self.swiglu:
            self.gate_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up_proj = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down_proj = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.down_proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn == "geglu":
            return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))
        if self.swiglu:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.ffn == "relu2_mlp":  # modded-nanogpt's ReLU squared
            return self.down_proj(F.relu(self.up_proj(x)).square())
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))  # GPT-2's gelu_new


class Block(nn.Module):
    """One layer. The norms carry Hugging Face's names for each placement: with "pre", the
    post_attention_layernorm is the MLP's input norm (Llama's naming); with "post" and "sandwich" it
    normalises the attention's output, as in OLMo 2 and Gemma."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.placement = config.norm_placement
        if self.placement != "post":
            self.input_layernorm = Norm(config)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = Norm(config)
        if self.placement == "sandwich":
            self.pre_feedforward_layernorm = Norm(config)
        if self.placement != "pre":
            self.post_feedforward_layernorm = Norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, pos, rope, cache, mask, attn_weights):
        attn = lambda h: self.self_attn(h, pos, rope, cache, mask, attn_weights)  # noqa: E731
        if self.placement == "pre":
            x = x + self.dropout(attn(self.input_layernorm(x)))
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        if self.placement == "post":
            x = x + self.dropout(self.post_attention_layernorm(attn(x)))
            return x + self.dropout(self.post_feedforward_layernorm(self.mlp(x)))
        x = x + self.dropout(self.post_attention_layernorm(attn(self.input_layernorm(x))))
        return x + self.dropout(self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x))))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        if config.pos == "learned":
            self.embed_positions = nn.Embedding(config.block_size, config.d_model)
        else:
            self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
            if config.local_rope_theta is not None:
                self.register_buffer(
                    "inv_freq_local", rope_inv_freq(config, config.local_rope_theta), persistent=False
                )
        self.drop = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = Norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer), or zero
        # with zero_init_residual (modded-nanogpt: every block starts as the identity)
        if isinstance(module, nn.Linear):
            residual = getattr(module, "residual", False)
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if residual else 0.02
            if residual and self.config.zero_init_residual:
                nn.init.zeros_(module.weight)
            else:
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def init_rope(self) -> None:
        """Recompute the RoPE tables (buffers that are not saved: after `to_empty`, for instance)."""
        if self.config.pos != "rope":
            return
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        if self.config.local_rope_theta is not None:
            self.inv_freq_local = rope_inv_freq(self.config, self.config.local_rope_theta).to(
                self.inv_freq.device
            )

    def hidden(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_weights: list | None = None,
        hidden_states: list | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states (B, T, d_model).

        idx: (B, T) token ids. pos: (B, T) positions; default cache.lengths[b] + t, or 0..T-1 without a cache.
        attn_weights / hidden_states: lists the caller passes to collect per-layer attention (B, H, T, S)
        and the residual stream entering each layer plus the final normed output.
        inputs_embeds: (B, T, d_model) token embeddings used instead of embed_tokens(idx) (idx may then be
        None); for attributions that differentiate with respect to the input embeddings.
        """
        B, T = idx.shape if inputs_embeds is None else inputs_embeds.shape[:2]
        device = idx.device if inputs_embeds is None else inputs_embeds.device
        # the last position; known without reading a tensor when there is no cache (compile-friendly)
        last = T - 1 if cache is None and pos is None else None
        if pos is None:
            start = cache.lengths[:, None] if cache is not None else 0
            pos = start + torch.arange(T, device=device)[None, :].expand(B, T)
        if last is None and (cache is not None or self.config.pos == "learned"):
            last = int(pos.max())
        if self.config.pos == "learned" and last >= self.config.block_size:
            raise ValueError(f"position {last} is beyond the context of {self.config.block_size} tokens")
        x = self.embed_tokens(idx) if inputs_embeds is None else inputs_embeds
        c = self.config
        if c.embed_scale:  # Gemma: sqrt(d_model), rounded to the activations' dtype as Gemma does
            x = x * torch.tensor(c.d_model**0.5, dtype=x.dtype)
        rope = rope_local = None
        if c.pos == "learned":
            x = x + self.embed_positions(pos)
        else:
            rope = _rope_tables(pos, self.inv_freq, x.dtype)
            if c.local_rope_theta is not None:
                rope_local = _rope_tables(pos, self.inv_freq_local, x.dtype)
        mask = local = None  # without a cache: causal
        if cache is not None:  # query at position p sees slots 0..p of its own row: (B, 1, T, S)
            keys = torch.arange(last + 1, device=device)[None, None, None, :]
            mask = keys <= pos[:, None, :, None]
        if c.sliding_window is not None:  # and only the last `sliding_window` of them in a local layer
            keys = keys if cache is not None else pos[:, None, None, :]
            local = (keys <= pos[:, None, :, None]) & (pos[:, None, :, None] - keys < c.sliding_window)
        x = self.drop(x)
        for block in self.layers:
            if hidden_states is not None:
                hidden_states.append(x)
            a = block.self_attn
            r = (rope_local if a.window is not None and rope_local is not None else rope) if a.rope else None
            x = block(x, pos, r, cache, local if a.window is not None else mask, attn_weights)
        x = self.norm(x)
        if hidden_states is not None:
            hidden_states.append(x)
        return x

    def forward(
        self,
        idx: torch.Tensor,
        pos: torch.Tensor | None = None,
        cache: KVCache | None = None,
        attn_weights: list | None = None,
        hidden_states: list | None = None,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, vocab_size); given `targets` (B, T), the mean cross-entropy instead (positions
        with target -100 skipped), fused with lm_head so the (B, T, V) logits are never stored whole."""
        if targets is None:
            return self.logits(self.hidden(idx, pos, cache, attn_weights, hidden_states))
        # tied embeddings: the lookup's gradient is added into the loss's (loss.py), not a second (V, d) tensor
        emb, tie = tied_lookup(idx, self.embed_tokens, self.lm_head) or (None, None)
        h = self.hidden(idx, pos, cache, attn_weights, hidden_states, inputs_embeds=emb)
        return linear_cross_entropy(h, self.lm_head, targets, softcap=self.config.logit_softcap, tie=tie)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head over hidden states (..., d_model) -> (..., vocab_size), soft-capped when the config says
        so; every caller that turns hidden states into logits goes through here, never lm_head alone."""
        z = self.lm_head(h)
        cap = self.config.logit_softcap
        return z if cap is None else cap * torch.tanh(z / cap)

    def lm_head_weight_tied(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight


def _rope_tables(
    pos: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = pos[..., None].float() * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D): HF rotate-half layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


__all__ = ["FFNS", "NORM_PLACEMENTS", "Block", "ModelConfig", "Transformer"]
