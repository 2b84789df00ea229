"""The P-EAGLE drafter (DESIGN §2): an EAGLE-3-style Llama head that drafts K tokens in one pass.

The same module is the EAGLE-3 baseline (DESIGN §5) when ``spec.parallel`` is False: no
``mask_hidden`` (vLLM takes a ``mask_hidden`` tensor as the mark of a P-EAGLE drafter), and the
hidden input of a drafted token is the drafter's own previous pre-norm output, H wide, used
without ``fc`` (as vLLM's ``llama_eagle3`` does: fc applies only to 3H-wide target features).

Shapes: B batch, L elements, H target hidden size, V vocabulary. Parameter names follow vLLM's
``LlamaForCausalLMEagle3`` so ``state_dict()`` is the exported checkpoint as it is (DESIGN §7).

Layer 0 sees ``concat(input_layernorm(embed), hidden_norm(h))`` (width 2H) with the un-normed
hidden half ``h`` as its residual (``norm_before_residual: false``); later layers are plain Llama
layers. ``h`` is ``fc(g)`` for real rows and ``fc(mask_hidden)`` for mask (MTP) slots.

Hidden input of a mask slot at depth d >= 1 of the chain anchored at a (``spec.hidden_variant``;
the paper's Table 3 compares them and does not define the four alternatives: these definitions
are inferred, all in the 3H feature space before ``fc``, ``g_a`` the anchor's target features):

- ``shared``: ``mask_hidden`` (P-EAGLE's learnable ``h_shared``; the only one vLLM serves);
- ``depth_encoding``: ``mask_hidden + depth_hidden[d-1]``, a learned vector per depth (init 0);
- ``ntp_depth_encoding``: ``g_a + depth_hidden[d-1]``;
- ``ntp``: ``g_a``, the anchor's own (NTP) hidden state;
- ``regularized_ntp``: ``mask_hidden + ntp_alpha * g_a``, ``ntp_alpha`` a learnable scalar (init 0.1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from peagle.attention import ElementMeta, element_attention


HIDDEN_VARIANTS = ("shared", "depth_encoding", "ntp_depth_encoding", "ntp", "regularized_ntp")
DEPTH_VARIANTS = ("depth_encoding", "ntp_depth_encoding")
ALPHA_INIT = 0.1


@dataclass(frozen=True)
class DrafterSpec:
    """Everything needed to rebuild a drafter; stored in its checkpoint."""

    hidden_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    mask_token_id: int
    aux_layer_ids: list[int] = field(default_factory=list)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    mask_hidden_init_std: float = 1.0
    # False = EAGLE-3 (autoregressive, no mask_hidden). Defaults to True so that checkpoints
    # written before the field existed load as the P-EAGLE drafters they are.
    parallel: bool = True
    # The mask slots' hidden input (module docstring); ``max_depth``: the deepest mask slot a
    # depth encoding covers (K_train - 1).
    hidden_variant: str = "shared"
    max_depth: int = 0

    def __post_init__(self) -> None:
        if self.hidden_variant not in HIDDEN_VARIANTS:
            raise ValueError(f"hidden_variant {self.hidden_variant!r}: use one of {', '.join(HIDDEN_VARIANTS)}")
        if self.hidden_variant != "shared" and not self.parallel:
            raise ValueError(f"hidden_variant {self.hidden_variant!r} needs a parallel drafter (EAGLE-3 has no mask slots)")
        if self.hidden_variant in DEPTH_VARIANTS and self.max_depth < 1:
            raise ValueError(f"hidden_variant {self.hidden_variant!r} needs max_depth >= 1 (K_train - 1)")

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32 (like the Llama reference) so bf16 runs match fp32 ones closely;
        # float64 stays float64 for exact tests.
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * xf).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, L] -> cos, sin [B, 1, L, head_dim] (Llama's half-split rotary layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # [B, L, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Per-layer keys/values [B, kv_heads, T, head_dim]; ``crop`` drops rejected or mask slots."""

    def __init__(self, num_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def crop(self, length: int) -> None:
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[i], self.values[i] = k[:, :, :length], v[:, :, :length]


class Attention(nn.Module):
    def __init__(self, spec: DrafterSpec, in_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(in_dim, spec.num_heads * spec.head_dim, bias=False)
        self.k_proj = nn.Linear(in_dim, spec.num_kv_heads * spec.head_dim, bias=False)
        self.v_proj = nn.Linear(in_dim, spec.num_kv_heads * spec.head_dim, bias=False)
        self.o_proj = nn.Linear(spec.num_heads * spec.head_dim, spec.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, layer: int):
        """x [B, L, in_dim]; attn_mask bool [B, L, L_keys] (True = attend), an
        :class:`~peagle.attention.ElementMeta` (mask-free cross-depth attention) or an object with
        ``attend(layer, q, k, v) -> out`` (q [B, heads, L, hd], k/v [B, kv_heads, L, hd] after RoPE,
        out [B, heads, L, hd]; EAGLE-3's training-time test, :mod:`peagle.eagle3`); -> [B, L, H]."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        if isinstance(attn_mask, ElementMeta):
            if cache is not None:
                raise ValueError("mask-free attention (ElementMeta) is for training; it takes no KV cache")
            out = element_attention(q, k, v, attn_mask)
        elif hasattr(attn_mask, "attend"):
            if cache is not None:
                raise ValueError("a custom attention (attend) keeps its own keys; it takes no KV cache")
            out = attn_mask.attend(layer, q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask[:, None], enable_gqa=self.num_kv_heads != self.num_heads
            )
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: DrafterSpec, first: bool) -> None:
        super().__init__()
        h = spec.hidden_size
        self.first = first
        self.input_layernorm = RMSNorm(h, spec.rms_norm_eps)
        if first:
            self.hidden_norm = RMSNorm(h, spec.rms_norm_eps)
        self.self_attn = Attention(spec, 2 * h if first else h)
        self.post_attention_layernorm = RMSNorm(h, spec.rms_norm_eps)
        self.mlp = MLP(h, spec.intermediate_size)

    def forward(self, h, embeds, cos, sin, attn_mask, cache, layer):
        if self.first:
            x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(h)], dim=-1)
        else:
            x = self.input_layernorm(h)
        h = h + self.self_attn(x, cos, sin, attn_mask, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


def causal_mask_with_cache(new: int, cached: int, batch: int, device) -> torch.Tensor:
    """bool [B, new, cached + new]: each new element sees the cache and new elements up to itself."""
    m = torch.ones(new, cached + new, dtype=torch.bool, device=device).tril(diagonal=cached)
    return m.expand(batch, -1, -1)


class PEagleDrafter(nn.Module):
    """fc (3H->H) + token embedding + N decoder layers + final norm + LM head (+ ``mask_hidden``
    when ``spec.parallel``; an EAGLE-3 drafter has none)."""

    def __init__(self, spec: DrafterSpec) -> None:
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        self.fc = nn.Linear(3 * h, h, bias=False)
        self.embed_tokens = nn.Embedding(spec.vocab_size, h)
        self.layers = nn.ModuleList(DecoderLayer(spec, first=i == 0) for i in range(spec.num_layers))
        self.norm = RMSNorm(h, spec.rms_norm_eps)
        self.lm_head = nn.Linear(h, spec.vocab_size, bias=False)
        # One learnable 3H vector shared by every depth: the hidden input of all mask slots.
        # Not even registered for EAGLE-3, so its state_dict / export has no such tensor.
        self.mask_hidden = (nn.Parameter(torch.randn(1, 1, 3 * h) * spec.mask_hidden_init_std)
                            if spec.parallel else None)
        # Table 3's alternatives (module docstring); absent for the shared design, so its
        # state_dict is the exported checkpoint as before.
        self.depth_hidden = (nn.Parameter(torch.zeros(spec.max_depth, 3 * h))
                             if spec.hidden_variant in DEPTH_VARIANTS else None)
        self.ntp_alpha = nn.Parameter(torch.tensor(ALPHA_INIT)) if spec.hidden_variant == "regularized_ntp" else None
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)

    def _mask_features(self, hidden: torch.Tensor | None, depths: torch.Tensor | None) -> torch.Tensor:
        """The mask slots' 3H input before fc, [1, 1, 3H] (shared) or [B, L, 3H] (the others)."""
        variant = self.spec.hidden_variant
        if variant == "shared":
            return self.mask_hidden
        if hidden is None or hidden.shape[-1] != 3 * self.spec.hidden_size:
            raise ValueError(f"hidden_variant {variant!r} needs the anchor's 3H target features at the mask slots")
        g = hidden.to(self.mask_hidden.dtype)
        if variant == "ntp":
            return g
        if variant == "regularized_ntp":
            return self.mask_hidden + self.ntp_alpha * g
        if depths is None:
            raise ValueError(f"hidden_variant {variant!r} needs each element's depth (depths [B, L])")
        enc = self.depth_hidden[(depths - 1).clamp(0, self.spec.max_depth - 1)]
        return (self.mask_hidden if variant == "depth_encoding" else g) + enc

    def _input_hidden(self, hidden: torch.Tensor | None, is_mask: torch.Tensor | None, b: int,
                      n: int, depths: torch.Tensor | None = None) -> torch.Tensor:
        """Layer 0's hidden half [B, L, H]: fc(3H features), H-wide inputs as they are, and on mask
        slots fc of the variant's mask features (module docstring)."""
        width = self.spec.hidden_size
        if hidden is not None and hidden.shape[-1] not in (width, 3 * width):
            raise ValueError(f"hidden input has width {hidden.shape[-1]}; expected {3 * width} (target "
                             f"features) or {width} (the drafter's own output)")
        if self.mask_hidden is None:
            if hidden is None or (is_mask is not None and bool(is_mask.any())):
                raise ValueError("an EAGLE-3 drafter (spec.parallel False) has no mask slots")
            hidden = hidden.to(self.fc.weight.dtype)
            return hidden if hidden.shape[-1] == width else self.fc(hidden)
        if depths is not None and self.depth_hidden is not None and int(depths.max()) > self.spec.max_depth:
            raise ValueError(f"depth {int(depths.max())} is deeper than the {self.spec.max_depth} mask-slot depths "
                             "this drafter's depth encoding was trained for")
        mask_h = self.fc(self._mask_features(hidden, depths))  # [1, 1, H] or [B, L, H]
        if hidden is None:
            return mask_h.expand(b, n, -1)
        hidden = hidden.to(mask_h.dtype)
        h = hidden if hidden.shape[-1] == width else self.fc(hidden)
        return h if is_mask is None else torch.where(is_mask[..., None], mask_h, h)

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor | None,
        is_mask: torch.Tensor | None,
        positions: torch.Tensor,
        attn_mask=None,
        cache: KVCache | None = None,
        return_prenorm: bool = False,
        depths: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Final normed hidden states [B, L, H] (and, with ``return_prenorm``, the last layer's
        residual-stream output before the final norm, [B, L, H]: EAGLE-3's next hidden input).

        input_ids [B, L]; hidden [B, L, 3H] target features, or [B, L, H] states already in the
        drafter's width (used without ``fc``); ignored where ``is_mask``; may be None when every
        element is a mask slot. is_mask bool [B, L] or None (no mask slots); positions [B, L]
        (anchor + depth); attn_mask bool [B, L, L_keys], an ElementMeta of the L elements
        (mask-free), an ``attend`` object (see :class:`Attention`), or None for causal attention
        over ``cache`` + these elements. ``depths`` [B, L] (0 on real rows): needed by the depth
        encodings only. The non-shared variants read ``hidden`` at the mask slots: the anchor's features.
        """
        b, n = input_ids.shape
        h = self._input_hidden(hidden, is_mask, b, n, depths)
        embeds = self.embed_tokens(input_ids)
        if attn_mask is None:
            attn_mask = causal_mask_with_cache(n, 0 if cache is None else cache.length, b, input_ids.device)
        cos, sin = rope_cos_sin(positions, self.spec.head_dim, self.spec.rope_theta, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, embeds, cos, sin, attn_mask, cache, i)
        return (self.norm(h), h) if return_prenorm else self.norm(h)

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """Logits [B, L, V]; same arguments as :meth:`forward_hidden`."""
        return self.lm_head(self.forward_hidden(*args, **kwargs))


def build_drafter(spec: DrafterSpec, embed: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
                  seed: int = 0) -> PEagleDrafter:
    """A freshly initialised drafter; ``embed``/``lm_head`` [V, H] are copied from the target if given."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = PEagleDrafter(spec)
    finally:
        torch.random.set_rng_state(gen_state)
    with torch.no_grad():
        if embed is not None:
            model.embed_tokens.weight.copy_(embed)
        if lm_head is not None:
            model.lm_head.weight.copy_(lm_head)
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

