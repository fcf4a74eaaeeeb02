"""The GPT model: a small, modern, nanochat-class decoder-only transformer.

Architecture (every choice is on purpose; only the value embeddings can be switched off):
- token embedding (untied from the unembedding `lm_head`), no positional embedding table;
- rotary position embeddings (RoPE, base 10000) on queries and keys;
- QK-norm: parameter-free RMSNorm on q and k per head (stabilises attention logits);
- parameter-free RMSNorm (`F.rms_norm`, no gain) before attention, before the MLP, after the embedding
  and before the unembedding;
- ReLU^2 MLP with a 4x hidden width; no biases anywhere;
- grouped-query / multi-query attention through `n_kv_head` (n_head % n_kv_head == 0);
- logit soft-capping `softcap * tanh(logits / softcap)`, logits always returned in float32;
- value embeddings (`value_embed_every`, 2 from config_from_depth): every second layer, counted back
  from the last, adds to its attention values a per-token vector from its own (vocab x kv width)
  table, scaled per kv head by a gate 2 sigmoid(W x[..., :32]) (1 at init). A lookup, so parameters
  without matmul FLOPs: -0.031 nats/token at equal compute for +0.3% step time, two seeds, at the cpu
  profile's shape (python -m scripts.bench_pretrain_quality; README, Performance).

The depth dial (`config_from_depth`), one number sets the model:
    n_embd    = depth * aspect_ratio                  (aspect_ratio=64 by default)
    n_head    = max(1, n_embd // head_dim)            (head_dim=128 by default), then lowered until it divides
                                                      n_embd (d7: 448 -> 2 heads of 224; d11: 4 heads of 176)
    n_kv_head = n_head                                (full multi-head attention unless you ask for GQA)
    n_layer   = depth
Parameter counts with vocab_size=65536 (per layer 12 * n_embd^2; embedding and lm_head each vocab * n_embd),
without the value-embedding tables (num_budget_params, what token budgets count), then with them:
    d8  : n_embd 512,  4 heads,  25.2M in blocks + 67.1M embed/unembed =  92.3M; + 4 x 33.6M  = 226.5M
    d12 : n_embd 768,  6 heads,  84.9M in blocks + 100.7M              = 185.6M; + 6 x 50.3M  = 487.6M
    d20 : n_embd 1280, 10 heads, 393.2M in blocks + 167.8M             = 561.0M; + 10 x 83.9M =  1.40B
    d26 : n_embd 1664, 13 heads, 863.8M in blocks + 218.1M             =   1.08B; + 13 x 109M =  2.50B
(The "d8 ~ 60M" of the user's table matches a 32K vocabulary; with the 64K default it is 92M.)

Dtype design (one rule): parameters are ALWAYS float32 (they are the master weights, the optimizers
do their math on them in fp32). The compute dtype is `common.autodetect_dtype(device)`: bf16 on CUDA
with SM >= 80, fp32 elsewhere, `NANOCHAT_DTYPE` overrides. When it is not fp32, `forward` wraps itself
in `torch.autocast(device_type, compute_dtype)`, so matmuls run in bf16 while weights, gradients and
optimizer state stay fp32. Callers do not need their own autocast. Logits are cast to fp32 before the
soft-cap and the loss. `model.compute_dtype` can be set explicitly (None = autodetect per device).

Weights init (nanochat-style): embedding N(0, 1) (its output is RMS-normed anyway), lm_head N(0, 0.001)
(near-uniform initial predictions), q/k/v and MLP input projections U(-a, a) with a = sqrt(3) / sqrt(n_embd)
(std n_embd^-0.5), and every output projection (attention c_proj, MLP c_proj) ZERO, so each block starts
as the identity and the residual stream is just the normalised embedding.

Construction on the meta device is supported and cheap (for parameter counting or for
`model.to_empty(device=...)` followed by `model.init_weights()`): `__init__` skips initialisation when
the parameters are on the meta device. On a real device `__init__` calls `init_weights()` itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import autodetect_dtype


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head, MQA when 1)
    n_embd: int = 768
    softcap: float = 15.0  # logit soft-cap; 0 disables it
    # Value embeddings: every k-th layer, counted back from the last, adds a per-token embedding to its
    # attention values (see CausalSelfAttention). 0 = none, the default here so that checkpoints from
    # before the field existed load as what they are; config_from_depth turns them on for new models.
    value_embed_every: int = 0


VE_GATE_CHANNELS = 32  # the gate of a value embedding reads the first channels of the block's input


def has_value_embed(config: GPTConfig, layer_idx: int) -> bool:
    k = config.value_embed_every
    return k > 0 and (config.n_layer - 1 - layer_idx) % k == 0


def config_from_depth(
    depth: int,
    vocab_size: int,
    sequence_len: int = 2048,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    value_embed_every: int = 2,
) -> GPTConfig:
    """The one dial: see the module docstring for the rules."""
    if depth < 1:
        raise ValueError(f"--depth must be >= 1, got {depth}")
    n_embd = depth * aspect_ratio
    n_head = max(1, n_embd // head_dim)
    while n_embd % n_head != 0:  # e.g. d7: 448 = 3 x 149.3 -> 2 heads of 224
        n_head -= 1
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head,
        n_embd=n_embd,
        value_embed_every=value_embed_every,
    )


def norm(x: torch.Tensor) -> torch.Tensor:
    # Parameter-free RMSNorm over the last dimension.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dimension. x: (B, T, H, D); cos/sin: (1 or B, T, 1, D/2)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class KVCache:
    """Pre-allocated key/value cache for incremental decoding.

    Layout: (num_layers, 2, batch_size, num_kv_heads, seq_len, head_dim). Each layer's attention calls
    `insert(layer_idx, k, v)` with the new keys/values (B, H_kv, T_new, D) and gets back views of all
    keys/values so far (B, H_kv, pos + T_new, D). The position advances after the last layer inserts,
    so one model forward = one step of the cache. `get_pos()` is the number of tokens already cached.

    Sampling n continuations of one prompt (what the engine does):
        cache = model.new_kv_cache(batch_size=1, seq_len=len(prompt) + max_tokens)  # model's device/dtype
        logits = model(torch.tensor([prompt]), kv_cache=cache)[:, -1]    # prefill once: (1, V)
        cache = cache.repeat_batch(n)                                    # n rows, same position
        ... sample next ids (n,) from logits.expand(n, -1) ...
        logits = model(next_ids[:, None], kv_cache=cache)[:, -1]         # one decode step: (n, V)
    Prefilling several tokens onto a non-empty cache is fine too (the causal mask is offset by get_pos()).

    Prompts of different lengths in one batch (RL rollouts): `pad` holds, per row, how many slots at the
    start are left padding. Prompts are right-aligned so every row writes its next token into the same
    slot; row b's token in slot s sits at position s - pad[b], and no query ever attends to a pad slot.
    GPT.forward turns `pad` into per-row rotary positions and an attention mask (attention_mask below).
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        seq_len: int,
        head_dim: int,
        num_layers: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.batch_size, self.num_kv_heads, self.seq_len = batch_size, num_kv_heads, seq_len
        self.head_dim, self.num_layers = head_dim, num_layers
        self.device, self.dtype = torch.device(device), dtype
        self.kv = torch.zeros(
            num_layers, 2, batch_size, num_kv_heads, seq_len, head_dim, device=device, dtype=dtype
        )
        self.pos = 0
        self.pad: torch.Tensor | None = (
            None  # (batch_size,) left-pad slots per row; None = no padding
        )

    def get_pos(self) -> int:
        return self.pos

    def insert(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, T, D = k.shape
        if B != self.batch_size or H != self.num_kv_heads or D != self.head_dim:
            raise ValueError(
                f"KVCache was built for (B={self.batch_size}, H_kv={self.num_kv_heads}, D={self.head_dim}) "
                f"but got keys of shape (B={B}, H_kv={H}, D={D})"
            )
        end = self.pos + T
        if end > self.seq_len:
            raise ValueError(
                f"KVCache overflow: {end} tokens > seq_len={self.seq_len}; build a longer cache"
            )
        self.kv[layer_idx, 0, :, :, self.pos : end] = k
        self.kv[layer_idx, 1, :, :, self.pos : end] = v
        keys, values = self.kv[layer_idx, 0, :, :, :end], self.kv[layer_idx, 1, :, :, :end]
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return keys, values

    def repeat_batch(self, n: int) -> "KVCache":
        """New cache with every row repeated n times (batch 1 prefill -> n samples), same position."""
        new = KVCache.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        new.batch_size = self.batch_size * n
        new.kv = self.kv.repeat_interleave(n, dim=2).contiguous()
        if self.pad is not None:
            new.pad = self.pad.repeat_interleave(n)
        return new

    def keep_rows(self, rows: torch.Tensor) -> "KVCache":
        """New cache holding only the given batch rows (finished samples leave the decode batch)."""
        new = KVCache.__new__(KVCache)
        new.__dict__.update(self.__dict__)
        new.batch_size = len(rows)
        new.kv = self.kv.index_select(2, rows)
        if self.pad is not None:
            new.pad = self.pad.index_select(0, rows)
        return new


def attention_mask(pad: torch.Tensor, pos: int, T: int) -> torch.Tensor:
    """Boolean (B, 1, T, pos + T) mask for left-padded rows, True = may attend.

    Query i of row b (slot pos + i) sees the slots pad[b] .. pos + i. A query that is itself a pad slot
    sees only itself: a row of all -inf would give NaN, and the NaN would leak into later layers
    through that slot's keys and values (0 * NaN is NaN), even though no real query reads them."""
    q = torch.arange(pos, pos + T, device=pad.device)[:, None]
    k = torch.arange(pos + T, device=pad.device)[None, :]
    visible = (k <= q)[None] & (k[None] >= pad[:, None, None])
    return (visible | (k == q)[None])[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.n_embd = config.n_head, config.n_kv_head, config.n_embd
        if config.n_embd % config.n_head != 0:
            raise ValueError(f"n_embd={config.n_embd} must be divisible by n_head={config.n_head}")
        if config.n_head % config.n_kv_head != 0:
            raise ValueError(
                f"n_head={config.n_head} must be divisible by n_kv_head={config.n_kv_head}"
            )
        self.head_dim = config.n_embd // config.n_head
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)
        # How much of the token's value embedding each kv head takes, from the input itself: 2 sigmoid(.)
        # in (0, 2), exactly 1 at init (zero weights).
        self.ve_gate = (
            nn.Linear(min(VE_GATE_CHANNELS, self.n_embd), self.n_kv_head, bias=False)
            if has_value_embed(config, layer_idx)
            else None
        )

    def forward(
        self,
        x,
        cos_sin,
        kv_cache: KVCache | None = None,
        attn_capture: list | None = None,
        attn_mask: torch.Tensor | None = None,
        value_embed: torch.Tensor | None = None,
    ):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if value_embed is not None:
            # A value that depends on the token id alone, next to the one computed from the residual
            # stream: parameters without matmul FLOPs (a lookup). Added before the cache stores v, so
            # decoding reuses it like any other value.
            gate = 2 * torch.sigmoid(
                self.ve_gate(x[..., : self.ve_gate.in_features])
            )  # (B, T, H_kv)
            ve = value_embed.view(B, T, self.n_kv_head, self.head_dim)
            v = v + (gate.unsqueeze(-1) * ve).to(v.dtype)  # the lookup is fp32: keep v in bf16
        cos, sin = cos_sin
        q, k = apply_rotary_emb(norm(q), cos, sin), apply_rotary_emb(norm(k), cos, sin)
        # (B, H, T, D) for attention; q/k/v share v's dtype (bf16 under autocast), the cache its own.
        q, k, v = q.transpose(1, 2).to(v.dtype), k.transpose(1, 2).to(v.dtype), v.transpose(1, 2)
        pos = 0
        if kv_cache is not None:
            pos = kv_cache.get_pos()
            k, v = kv_cache.insert(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        Tq, Tk = q.size(2), k.size(2)
        # Query i sits at absolute position pos + i and may see keys 0..pos + i.
        gqa = self.n_kv_head != self.n_head
        if attn_capture is not None:
            y = self._explicit_attention(q, k, v, pos, attn_capture, attn_mask)
        elif attn_mask is not None:  # left-padded rows (see KVCache)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif Tq == Tk:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head
            )
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.n_kv_head != self.n_head)
        else:
            mask = causal_mask(Tq, Tk, pos, q.device)
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=self.n_kv_head != self.n_head
            )
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)

    def _explicit_attention(self, q, k, v, pos, attn_capture, attn_mask=None):
        """softmax(QK^T / sqrt(d)) V in fp32, handing the probabilities [B, n_head, Tq, Tk] to
        attn_capture.append (a list keeps them; AttentionEntropy reduces them on the spot)."""
        rep = self.n_head // self.n_kv_head
        if rep > 1:  # same head grouping as SDPA's enable_gqa: query head h uses kv head h // rep
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        with torch.autocast(
            device_type=q.device.type, enabled=False
        ):  # fp32 even inside bf16 autocast
            scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
            mask = (
                attn_mask
                if attn_mask is not None
                else causal_mask(q.size(2), k.size(2), pos, q.device)
            )
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            y = probs @ v.float()
        attn_capture.append(probs)
        return y.to(v.dtype)


class AttentionEntropy:
    """An attn_capture that keeps, per layer, only the entropy of each head's attention distribution.

    Each layer's probabilities are reduced to entropies (nats) as soon as the layer has them, so at most
    one layer's matrix is alive at a time. `keep_probs=True` also keeps the probabilities of batch row 0
    (one (n_head, Tq, Tk) tensor per layer) for a heatmap."""

    def __init__(self, keep_probs: bool = False):
        self.entropy: list[torch.Tensor] = []  # per layer: (B, n_head, Tq)
        self.probs: list[torch.Tensor] = []
        self.keep_probs = keep_probs

    def append(self, probs: torch.Tensor) -> None:
        self.entropy.append(
            torch.special.entr(probs).sum(-1)
        )  # entr(0) = 0: masked keys add nothing
        if self.keep_probs:
            self.probs.append(probs[0].detach().cpu())

    def per_layer(self) -> list[float]:
        """Mean entropy of each layer over batch rows, heads and query positions."""
        return [e.mean().item() for e in self.entropy]


def causal_mask(Tq: int, Tk: int, pos: int, device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True = may attend. Query i is at absolute position pos + i."""
    qi = torch.arange(Tq, device=device).unsqueeze(1) + pos
    kj = torch.arange(Tk, device=device).unsqueeze(0)
    return kj <= qi


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self, x, cos_sin, kv_cache=None, attn_capture=None, attn_mask=None, value_embed=None
    ):
        x = x + self.attn(norm(x), cos_sin, kv_cache, attn_capture, attn_mask, value_embed)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                # _weight=empty skips nn.Embedding's own normal_ init (init_weights does it; on meta it is slow)
                wte=nn.Embedding(
                    config.vocab_size,
                    config.n_embd,
                    _weight=torch.empty(config.vocab_size, config.n_embd),
                ),
                h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # One value-embedding table (vocab x kv width) per layer that has one, keyed by layer index.
        kv_dim = config.n_kv_head * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(
                    config.vocab_size, kv_dim, _weight=torch.empty(config.vocab_size, kv_dim)
                )
                for i in range(config.n_layer)
                if has_value_embed(config, i)
            }
        )
        # Rotary tables cover 10x the training context so generation can run past it without a re-alloc.
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        # Filled by init_weights (left empty here so meta-device construction stays cheap);
        # not in state_dict: always recomputed from the config.
        table_shape = (1, self.rotary_seq_len, 1, head_dim // 2)
        self.register_buffer("cos", torch.empty(table_shape), persistent=False)
        self.register_buffer("sin", torch.empty(table_shape), persistent=False)
        self.compute_dtype: torch.dtype | None = (
            None  # None = common.autodetect_dtype(device) at forward
        )
        # Scalar losses through chunked_head_loss: the full logits are never materialised (GPU memory).
        self.chunked_loss = True
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @staticmethod
    def _rotary_tables(seq_len, head_dim, base=10000.0, device=None):
        inv_freq = 1.0 / (
            base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
        )
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the rotary tables in place (see module docstring)."""
        cfg = self.config
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3.0) * cfg.n_embd**-0.5  # uniform with std n_embd^-0.5
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)
        for (
            table
        ) in self.value_embeds.values():  # the scale of c_v's output per entry, like a value
            nn.init.uniform_(table.weight, -bound, bound)
        cos, sin = self._rotary_tables(
            self.rotary_seq_len, cfg.n_embd // cfg.n_head, device=self.cos.device
        )
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def get_compute_dtype(self, device: torch.device | None = None) -> torch.dtype:
        if self.compute_dtype is not None:
            return self.compute_dtype
        return autodetect_dtype(device if device is not None else self.get_device())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_budget_params(self) -> int:
        """The parameters a token budget (tokens per parameter) counts: all but the value-embedding
        tables, lookups that would multiply the budget without adding compute per token."""
        return self.num_params() - sum(t.weight.numel() for t in self.value_embeds.values())

    def estimate_flops(self) -> float:
        """Training FLOPs per token (fwd + bwd): 6 * (params in matmuls) + attention score/value matmuls.

        Embedding lookups are not matmuls, so wte and the value embeddings are excluded; lm_head is
        included. The attention term 12 * n_layer * n_head * head_dim * sequence_len counts QK^T and AV
        (2 matmuls x 2 FLOPs x 3 for fwd+bwd) at full context, ignoring the causal halving, as
        nanochat/PaLM do.
        """
        cfg = self.config
        n_matmul = self.num_budget_params() - self.transformer.wte.weight.numel()
        head_dim = cfg.n_embd // cfg.n_head
        return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.n_head * head_dim * cfg.sequence_len

    def new_kv_cache(
        self, batch_size: int, seq_len: int | None = None, device=None, dtype=None
    ) -> KVCache:
        """A KVCache shaped for this model, on its device, in its compute dtype."""
        cfg = self.config
        device = device if device is not None else self.get_device()
        dtype = dtype if dtype is not None else self.get_compute_dtype(device)
        return KVCache(
            batch_size,
            cfg.n_kv_head,
            seq_len or cfg.sequence_len,
            cfg.n_embd // cfg.n_head,
            cfg.n_layer,
            device,
            dtype,
        )

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        loss_reduction: str = "mean",
        attn_capture: list | None = None,
    ):
        """idx (B, T) token ids. With targets (B, T, -1 = ignore): cross-entropy loss with `loss_reduction`
        ("mean" -> scalar over non-ignored tokens; "sum" -> scalar; "none" -> (B, T) with 0 at ignored
        positions). If every target is -1 the "mean" loss is an exact 0 that still has a graph (backward
        gives zero grads, never NaN). Without targets: float32 logits (B, T, vocab_size).
        kv_cache: tokens are placed after the cache's current position (prefill or decode).
        attn_capture: a list (or AttentionEntropy) -> the explicit attention path runs and appends one
        float32 tensor of attention probabilities [B, n_head, Tq, Tk] per layer (Tk includes cached
        tokens). Without it the fused SDPA kernels run and no probabilities are ever materialised."""
        B, T = idx.shape
        pos = kv_cache.get_pos() if kv_cache is not None else 0
        if pos + T > self.cos.size(1):
            raise ValueError(
                f"sequence of {pos + T} tokens exceeds the rotary table ({self.cos.size(1)})"
            )
        pad = kv_cache.pad if kv_cache is not None else None
        attn_mask = None
        if pad is None:
            cos_sin = self.cos[:, pos : pos + T], self.sin[:, pos : pos + T]
        else:
            # left-padded rows: row b's slot s holds position s - pad[b] (pad slots clamp to 0, unseen)
            positions = (
                torch.arange(pos, pos + T, device=idx.device)[None, :] - pad[:, None]
            ).clamp(min=0)
            cos_sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
            attn_mask = attention_mask(pad, pos, T)
        dtype = self.get_compute_dtype(idx.device)
        with torch.autocast(
            device_type=idx.device.type, dtype=dtype, enabled=dtype != torch.float32
        ):
            x = norm(self.transformer.wte(idx))
            for i, block in enumerate(self.transformer.h):
                ve = self.value_embeds[str(i)](idx) if str(i) in self.value_embeds else None
                x = block(x, cos_sin, kv_cache, attn_capture, attn_mask, ve)
            x = norm(x)
        if targets is not None and loss_reduction in ("mean", "sum") and self.chunked_loss:
            flat_targets = targets.reshape(-1)
            total = chunked_head_loss(
                x.reshape(-1, x.size(-1)),
                self.lm_head.weight,
                flat_targets,
                self.config.softcap,
                dtype,
            )
            if loss_reduction == "sum":
                return total
            return total / (flat_targets != -1).sum().clamp(min=1)
        with torch.autocast(
            device_type=idx.device.type, dtype=dtype, enabled=dtype != torch.float32
        ):
            logits = self.lm_head(x)
        logits = logits.float()
        if self.config.softcap:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        if targets is None:
            return logits
        flat_logits, flat_targets = logits.view(-1, logits.size(-1)), targets.reshape(-1)
        if loss_reduction == "mean":
            # sum / count with count clamped to 1: identical to "mean" normally, 0 (not NaN) if nothing counts.
            total = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="sum")
            return total / (flat_targets != -1).sum().clamp(min=1)
        if loss_reduction == "sum":
            return F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="sum")
        if loss_reduction == "none":
            return F.cross_entropy(
                flat_logits, flat_targets, ignore_index=-1, reduction="none"
            ).view(B, T)
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")

    def setup_optimizers(
        self,
        unembedding_lr: float = 0.004,
        embedding_lr: float = 0.2,
        matrix_lr: float = 0.02,
        weight_decay: float = 0.0,
        scalar_lr: float = 0.5,
        adam_betas=(0.8, 0.95),
        muon_momentum: float = 0.95,
    ) -> list[torch.optim.Optimizer]:
        """[AdamW (embedding, lm_head, any <2-D params), Muon (2-D block matrices)], distributed when
        torch.distributed is initialised: then do NOT wrap the model in DDP, step() averages the gradients
        (use optim.clip_grad_norm_(optimizers, max_norm) for clipping). See nanochat/optim.py for the lr rules."""
        from nanochat.optim import build_optimizers

        return build_optimizers(
            self,
            unembedding_lr=unembedding_lr,
            embedding_lr=embedding_lr,
            matrix_lr=matrix_lr,
            weight_decay=weight_decay,
            scalar_lr=scalar_lr,
            adam_betas=adam_betas,
            muon_momentum=muon_momentum,
        )


class _ChunkedHeadLoss(torch.autograd.Function):
    """lm_head + softcap + summed cross-entropy over chunks of rows, its gradients computed in the
    forward: only one chunk's (rows, vocab) logits ever exist, never the whole batch's (at 32 x 2048
    rows and a 65,536 vocabulary the float32 logits alone are 17 GB, and autograd keeps them plus their
    gradient). Works because the loss is a scalar: the backward only scales the stored gradients."""

    @staticmethod
    def forward(
        ctx, h, weight, targets, softcap: float, chunk: int, dtype, need_grads: bool = True
    ):
        w = weight.to(dtype)
        if need_grads:
            grad_h = torch.empty_like(h, dtype=torch.float32)
            grad_w = torch.zeros_like(weight, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.size(0), chunk):
            hc, tc = h[start : start + chunk].to(dtype), targets[start : start + chunk]
            z = (hc @ w.t()).float()
            logits = softcap * torch.tanh(z / softcap) if softcap else z
            valid = tc != -1
            safe = tc.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
            if not need_grads:  # evaluation under no_grad: the loss only
                continue
            grad = torch.softmax(
                logits, dim=-1
            )  # d loss / d logits = softmax - onehot, 0 on ignored rows
            grad[torch.arange(grad.size(0), device=grad.device), safe] -= 1.0
            grad *= valid[:, None]
            if softcap:
                grad *= 1.0 - (logits / softcap) ** 2  # d(c tanh(z/c))/dz
            grad = grad.to(dtype)
            grad_h[start : start + chunk] = (grad @ w).float()
            grad_w += (grad.t() @ hc).float()
        if need_grads:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (h.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        return (
            (grad_h * grad_out).to(h_dtype),
            (grad_w * grad_out).to(w_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def chunked_head_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float,
    dtype: torch.dtype,
    chunk: int = 4096,
) -> torch.Tensor:
    """Summed cross-entropy of softcap(h @ weight.T) against targets (-1 = ignored), h (N, d), without
    materialising the (N, vocab) logits (see _ChunkedHeadLoss). Matmuls run in `dtype`."""
    need_grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedHeadLoss.apply(
        h, weight, targets, float(softcap or 0.0), chunk, dtype, need_grads
    )

