"""The GPT model: a nanochat-class decoder-only transformer, its KV cache and attention capture.

Token embedding (untied from lm_head), rotary positions, QK-norm, parameter-free RMSNorm, ReLU^2
MLP, no biases, grouped-query attention, soft-capped logits and value embeddings. Parameters are
always float32: they are the master weights the optimizers update. forward runs in the compute dtype
(common.autodetect_dtype: bf16 on CUDA with SM >= 80, fp32 elsewhere): the embedding lookups are
cast to it, so the residual stream and every activation saved for backward are bf16 there, and the
matmuls run under autocast; callers need no autocast of their own. When to torch.compile it:
nanochat/compile.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.common import autodetect_dtype
from nanochat.optim import build_optimizers


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head, MQA when 1)
    n_embd: int = 768
    softcap: float = 15.0  # logit soft-cap; 0 disables it
    # Value embeddings: every k-th layer, counted back from the last, adds a per-token embedding to
    # its attention values (see CausalSelfAttention). 0 = none, the default here so that checkpoints
    # from before the field existed load as what they are; config_from_depth turns them on.
    value_embed_every: int = 0


# Rows of final hidden states turned into logits at a time by the chunked loss paths: 4096 rows x
# a 65,536 vocabulary is 1 GiB per fp32 copy of the logits.
HEAD_CHUNK_ROWS = 4096
VE_GATE_CHANNELS = 32  # the gate of a value embedding reads the first channels of the block's input


def has_value_embed(config: GPTConfig, layer_idx: int) -> bool:
    k = config.value_embed_every
    # counted back from the last layer, so the last layer always has one whatever the depth
    return k > 0 and (config.n_layer - 1 - layer_idx) % k == 0


def config_from_depth(
    depth: int,
    vocab_size: int,
    sequence_len: int = 2048,
    aspect_ratio: int = 64,
    head_dim: int = 128,
    value_embed_every: int = 2,
) -> GPTConfig:
    """The one dial: depth sets the layers, the width (depth * aspect_ratio) and the heads."""
    # Parameter counts with vocab_size=65536: 12 * n_embd^2 per layer, vocab * n_embd each for the
    # embedding and lm_head; then with the value-embedding tables, which num_budget_params omits:
    #   d8 : n_embd  512,  4 heads,  25.2M in blocks +  67.1M embed/unembed =  92.3M; 226.5M
    #   d12: n_embd  768,  6 heads,  84.9M in blocks + 100.7M               = 185.6M; 487.6M
    #   d20: n_embd 1280, 10 heads, 393.2M in blocks + 167.8M               = 561.0M;  1.40B
    #   d26: n_embd 1664, 13 heads, 863.8M in blocks + 218.1M               =  1.08B;  2.50B
    # (a 32K vocabulary makes d8 about 60M)
    if depth < 1:
        raise ValueError(f"--depth must be >= 1, got {depth}")
    n_embd = depth * aspect_ratio
    n_head = max(1, n_embd // head_dim)
    # heads of about head_dim channels, as many as divide the width evenly
    while n_embd % n_head != 0:  # e.g. d7: 448 = 3 x 149.3 -> 2 heads of 224; d11: 4 heads of 176
        n_head -= 1
    return GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=depth,
        n_head=n_head,
        n_kv_head=n_head,  # full multi-head attention unless a caller asks for GQA
        n_embd=n_embd,
        value_embed_every=value_embed_every,
    )


def norm(x: torch.Tensor) -> torch.Tensor:
    # RMSNorm without a learned gain: the next matmul can learn any per-channel scale it needs.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, D) by its positions' angles; cos/sin (1 or B, T, 1, D/2)."""
    # Half-split convention: channel i is paired with channel i + D/2 (not with its neighbour
    # 2i + 1), so the pairs are two contiguous slices instead of a strided gather. Both conventions
    # are RoPE, but a checkpoint only works with the one it was trained with: never change it.
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    y1 = x1 * cos + x2 * sin
    y2 = x1 * (-sin) + x2 * cos
    return torch.cat([y1, y2], dim=-1).to(x.dtype)


class KVCache:
    """Pre-allocated keys and values of every layer, for decoding one token at a time.

    Layout: (num_layers, 2, batch_size, num_kv_heads, seq_len, head_dim). One model forward is one
    step of the cache: get_pos() tokens are cached, each layer inserts its new keys/values after
    them, and the position advances once the last layer has inserted.
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
        self.batch_size = batch_size
        self.num_kv_heads = num_kv_heads
        self.seq_len = seq_len
        self.head_dim = head_dim
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.dtype = dtype
        self.kv = torch.zeros(
            num_layers, 2, batch_size, num_kv_heads, seq_len, head_dim, device=device, dtype=dtype
        )
        self.pos = 0
        # Prompts of different lengths in one batch (RL rollouts) are right-aligned, so every row
        # writes its next token into the same slot; pad[b] counts row b's left-padding slots, and
        # its token in slot s sits at position s - pad[b]. None = no padding. GPT.forward turns it
        # into per-row rotary positions and an attention mask that hides the pad slots.
        self.pad: torch.Tensor | None = None

    def get_pos(self) -> int:
        return self.pos

    def insert(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H_kv, T_new, D) after the cached tokens; return views of all so far."""
        B, H, T, D = k.shape
        if B != self.batch_size or H != self.num_kv_heads or D != self.head_dim:
            raise ValueError(
                f"KVCache was built for (B={self.batch_size}, H_kv={self.num_kv_heads}, "
                f"D={self.head_dim}) but got keys of shape (B={B}, H_kv={H}, D={D})"
            )
        end = self.pos + T
        if end > self.seq_len:
            raise ValueError(
                f"KVCache overflow: {end} tokens > seq_len={self.seq_len}; build a longer cache"
            )
        self.kv[layer_idx, 0, :, :, self.pos : end] = k
        self.kv[layer_idx, 1, :, :, self.pos : end] = v
        keys = self.kv[layer_idx, 0, :, :, :end]
        values = self.kv[layer_idx, 1, :, :, :end]
        # Every layer of this forward must see the same pos (the rotary offset of the new tokens),
        # so it only moves on after the last one.
        if layer_idx == self.num_layers - 1:
            self.pos = end
        return keys, values

    def repeat_batch(self, n: int) -> "KVCache":
        """New cache with every row repeated n times (prefill once, sample n), same position."""
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


def causal_mask(Tq: int, Tk: int, pos: int, device) -> torch.Tensor:
    """Boolean (Tq, Tk) mask, True = may attend. Query i is at absolute position pos + i."""
    qi = torch.arange(Tq, device=device).unsqueeze(1) + pos
    kj = torch.arange(Tk, device=device).unsqueeze(0)
    return kj <= qi


def attention_mask(pad: torch.Tensor, pos: int, T: int) -> torch.Tensor:
    """Boolean (B, 1, T, pos + T) mask for left-padded rows, True = may attend.

    Query i of row b (slot pos + i) sees the slots pad[b] .. pos + i."""
    q = torch.arange(pos, pos + T, device=pad.device)[:, None]
    k = torch.arange(pos + T, device=pad.device)[None, :]
    visible = (k <= q)[None] & (k[None] >= pad[:, None, None])
    # A pad query must still see something: a row of -inf gives NaN, and the NaN would reach later
    # layers through that slot's keys and values (0 * NaN is NaN) though no real query reads them.
    # So a pad slot sees itself.
    return (visible | (k == q)[None])[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
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
        # How much of the token's value embedding each kv head takes, read from the input itself.
        self.ve_gate = None
        if has_value_embed(config, layer_idx):
            gate_in = min(VE_GATE_CHANNELS, self.n_embd)
            self.ve_gate = nn.Linear(gate_in, self.n_kv_head, bias=False)

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
            # Value embeddings: a value that depends on the token id alone, next to the one computed
            # from the residual stream; a lookup, so parameters without matmul FLOPs. The gate
            # 2 sigmoid(.) lies in (0, 2) and is exactly 1 at init (zero weights): a fresh model
            # adds each table once, and training learns per token and head how much to keep.
            # Added before the cache stores v, so decoding reuses it like any other value.
            gate = 2 * torch.sigmoid(self.ve_gate(x[..., : self.ve_gate.in_features]))  # (B,T,H_kv)
            ve = value_embed.view(B, T, self.n_kv_head, self.head_dim)
            v = v + (gate.unsqueeze(-1) * ve).to(v.dtype)  # keep v in v's dtype (bf16)
        cos, sin = cos_sin
        # QK-norm: with q and k at unit RMS per head, q.k / sqrt(d) stays bounded however large the
        # weights grow, so attention logits cannot blow up into one-hot softmaxes at high lrs.
        # Normalised before the rotation, which preserves the norm anyway.
        q = apply_rotary_emb(norm(q), cos, sin)
        k = apply_rotary_emb(norm(k), cos, sin)
        # (B, H, T, D) for attention; q, k, v in v's dtype (bf16 under autocast), the cache its own
        q = q.transpose(1, 2).to(v.dtype)
        k = k.transpose(1, 2).to(v.dtype)
        v = v.transpose(1, 2)
        pos = 0
        if kv_cache is not None:
            pos = kv_cache.get_pos()
            k, v = kv_cache.insert(self.layer_idx, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        # Query i sits at absolute position pos + i and may see keys 0..pos + i.
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_kv_head != self.n_head  # SDPA shares each kv head among n_head / n_kv_head
        if attn_capture is not None:
            y = self._explicit_attention(q, k, v, pos, attn_capture, attn_mask)
        elif attn_mask is not None:  # left-padded rows (see KVCache.pad)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif Tq == Tk:  # no cache, or a prefill onto an empty one: the plain causal triangle
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:  # one decoded token sees every cached key: no mask at all
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # several new tokens after cached ones: is_causal would align the triangle at 0
            mask = causal_mask(Tq, Tk, pos, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)

    def _explicit_attention(self, q, k, v, pos, attn_capture, attn_mask=None):
        """softmax(QK^T / sqrt(d)) V; the probabilities (B, n_head, Tq, Tk) go to attn_capture."""
        # The attention-capture path, for diagnostics only: the fused SDPA kernels never form the
        # probabilities, so this spells attention out (slower, and in fp32 so that entropies are
        # not bf16 noise). Its output matches SDPA's (tests/test_gpt.py).
        rep = self.n_head // self.n_kv_head
        if rep > 1:  # same head grouping as SDPA's enable_gqa: query head h uses kv head h // rep
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        with torch.autocast(device_type=q.device.type, enabled=False):  # fp32 inside bf16 autocast
            scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.head_dim)
            mask = attn_mask
            if mask is None:
                mask = causal_mask(q.size(2), k.size(2), pos, q.device)
            probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            y = probs @ v.float()
        attn_capture.append(probs)  # a list keeps them; AttentionEntropy reduces them on the spot
        return y.to(v.dtype)


class AttentionEntropy:
    """An attn_capture that keeps, per layer, only the entropy of each head's attention.

    Each layer's probabilities are reduced to entropies (nats) as soon as the layer has them, so at
    most one layer's matrix is alive at a time. `keep_probs=True` also keeps the probabilities of
    batch row 0 (one (n_head, Tq, Tk) tensor per layer) for a heatmap."""

    def __init__(self, keep_probs: bool = False):
        self.entropy: list[torch.Tensor] = []  # per layer: (B, n_head, Tq)
        self.probs: list[torch.Tensor] = []
        self.keep_probs = keep_probs

    def append(self, probs: torch.Tensor) -> None:
        # entr(p) = -p log p, with entr(0) = 0: masked keys add nothing
        self.entropy.append(torch.special.entr(probs).sum(-1))
        if self.keep_probs:
            self.probs.append(probs[0].detach().cpu())

    def per_layer(self) -> list[float]:
        """Mean entropy of each layer over batch rows, heads and query positions."""
        return [e.mean().item() for e in self.entropy]


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        # ReLU^2: as cheap as ReLU and as sparse; the modded-nanoGPT speedruns found it trains a
        # little better than GELU.
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(
        self, x, cos_sin, kv_cache=None, attn_capture=None, attn_mask=None, value_embed=None
    ):
        # pre-norm residual block: the residual stream itself is never normalised
        x = x + self.attn(norm(x), cos_sin, kv_cache, attn_capture, attn_mask, value_embed)
        x = x + self.mlp(norm(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        # _weight=empty skips nn.Embedding's own normal_ init: init_weights does it, and on the meta
        # device it would be slow.
        wte = nn.Embedding(
            config.vocab_size, config.n_embd, _weight=torch.empty(config.vocab_size, config.n_embd)
        )
        blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.transformer = nn.ModuleDict(dict(wte=wte, h=blocks))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # One value-embedding table (vocab x kv width) per layer that has one, keyed by layer index.
        head_dim = config.n_embd // config.n_head
        kv_dim = config.n_kv_head * head_dim
        self.value_embeds = nn.ModuleDict(
            {
                str(i): nn.Embedding(
                    config.vocab_size, kv_dim, _weight=torch.empty(config.vocab_size, kv_dim)
                )
                for i in range(config.n_layer)
                if has_value_embed(config, i)
            }
        )
        # Rotary tables: the angles depend on position and frequency only, so cos and sin are
        # computed once and sliced per forward instead of running trig in every layer. They cover
        # 10x the training context, so generation can run past it without a re-allocation.
        # Not in state_dict (persistent=False): always rebuilt from the config, so old checkpoints
        # load. Filled by init_weights; left empty here so meta-device construction stays cheap.
        self.rotary_seq_len = config.sequence_len * 10
        table_shape = (1, self.rotary_seq_len, 1, head_dim // 2)
        self.register_buffer("cos", torch.empty(table_shape), persistent=False)
        self.register_buffer("sin", torch.empty(table_shape), persistent=False)
        self.compute_dtype: torch.dtype | None = None  # None = autodetect_dtype(device) at forward
        # Scalar losses go through chunked_head_loss, which never materialises the full logits.
        self.chunked_loss = True
        # On the meta device (parameter counting, or to_empty(device) + init_weights() later) the
        # initialisation is skipped.
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @staticmethod
    def _rotary_tables(seq_len, head_dim, base=10000.0, device=None):
        # Channel pair i turns by base^(-2i / head_dim) radians per token: from one radian down to
        # about 1 / base, so some pairs resolve neighbouring tokens and others distant ones.
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and the rotary tables in place."""
        cfg = self.config
        # The embedding's output is RMS-normed anyway; lm_head near 0 predicts near-uniformly.
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        bound = math.sqrt(3.0) * cfg.n_embd**-0.5  # uniform with std n_embd^-0.5
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                nn.init.uniform_(lin.weight, -bound, bound)
            # Zero output projections: every block starts as the identity, and the residual
            # stream is just the normalised embedding until training opens them.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.zeros_(block.attn.ve_gate.weight)  # gate 2 sigmoid(0) = 1
        # Value-embedding tables start at zero: a row moves only once its token occurs, so a token
        # that pretraining never shows (the chat special tokens) adds nothing to the values in
        # fine-tuning, rather than a random vector at a value's scale in every such layer.
        for table in self.value_embeds.values():
            nn.init.zeros_(table.weight)
        cos, sin = self._rotary_tables(
            self.rotary_seq_len, cfg.n_embd // cfg.n_head, device=self.cos.device
        )
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self) -> torch.device:
        return self.transformer.wte.weight.device

    def get_compute_dtype(self, device: torch.device | None = None) -> torch.dtype:
        # compute_dtype set by hand (tests, compile.maybe_compile) wins over the autodetection
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
        """Training FLOPs per token (forward + backward), for MFU."""
        cfg = self.config
        # 6 FLOPs per matmul parameter (2 forward, 4 backward). Embedding lookups are not matmuls,
        # so wte and the value embeddings are left out; lm_head counts.
        n_matmul = self.num_budget_params() - self.transformer.wte.weight.numel()
        # Plus the attention matmuls QK^T and AV: 2 matmuls x 2 FLOPs x 3 (fwd + bwd) per head
        # channel and context position, at full context: the causal halving is ignored, as in
        # nanochat and PaLM, so MFU figures compare.
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
        residual_capture: list | None = None,
    ):
        """Float32 logits (B, T, vocab) of token ids idx (B, T), or with targets (-1 = ignore) the
        cross-entropy: "mean" (scalar over counted tokens), "sum", or "none" ((B, T), 0 where
        ignored). With kv_cache, idx continues the cached tokens (prefill or decode). With
        attn_capture (a list or an AttentionEntropy), each layer appends its attention
        probabilities (B, n_head, Tq, Tk), Tk counting cached tokens. With residual_capture (a
        list, or anything with append), each layer appends its output, the residual stream
        (B, T, n_embd) before the final norm: the logit lens reads it."""
        B, T = idx.shape
        # Decoding: the new tokens come after the cached ones, so their rotary angles start at the
        # cache's position. Without a cache they start at 0.
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
            # left-padded rows: row b's slot s holds position s - pad[b] (pad slots, unseen, get 0)
            slots = torch.arange(pos, pos + T, device=idx.device)[None, :]
            positions = (slots - pad[:, None]).clamp(min=0)
            cos_sin = self.cos[0, positions], self.sin[0, positions]  # (B, T, 1, D/2)
            attn_mask = attention_mask(pad, pos, T)
        dtype = self.get_compute_dtype(idx.device)
        autocast = self.autocast_args(idx.device)
        x = self.hidden_states(idx, cos_sin, kv_cache, attn_capture, attn_mask, residual_capture)
        if targets is not None and loss_reduction in ("mean", "sum") and self.chunked_loss:
            flat_targets = targets.reshape(-1)
            hidden = x.reshape(-1, x.size(-1))
            if _eager_cpu(hidden):
                # Only rows with a target go through the head: in mid-training and SFT three rows
                # in four are prompt or padding, and the head is a quarter of a CPU step. Not on
                # a GPU (a boolean index waits for the device to count the rows: a host sync),
                # under torch.compile (shapes would depend on data), nor on the fake tensors of
                # scripts.plan_memory, which stand for a GPU's.
                keep = flat_targets != -1
                if not bool(keep.all()):
                    hidden, flat_targets = hidden[keep], flat_targets[keep]
            softcap = self.config.softcap
            total = chunked_head_loss(hidden, self.lm_head.weight, flat_targets, softcap, dtype)
            if loss_reduction == "sum":
                return total
            # count clamped to 1: a batch with every target ignored gives 0 with a graph, not NaN
            return total / (flat_targets != -1).sum().clamp(min=1)
        no_grads = not torch.is_grad_enabled()
        if targets is not None and loss_reduction == "none" and self.chunked_loss and no_grads:
            # Evaluation (bits per byte, the RL reference): per-token losses a chunk of rows at a
            # time, so the (rows, vocab) fp32 logits of a 32 x 2048 batch (17 GB per copy at a
            # 65,536 vocabulary) never exist at once. With gradients each chunk's logits would be
            # kept for backward anyway: that path stays the plain one below.
            flat_targets = targets.reshape(-1)
            hidden = x.reshape(-1, x.size(-1))
            chunk = HEAD_CHUNK_ROWS
            per_token = torch.cat(
                [
                    F.cross_entropy(
                        self._head_logits(hidden[s : s + chunk], autocast),
                        flat_targets[s : s + chunk],
                        ignore_index=-1,
                        reduction="none",
                    )
                    for s in range(0, hidden.size(0), chunk)
                ]
            )
            return per_token.view(B, T)
        logits = self._head_logits(x, autocast)
        if targets is None:
            return logits
        flat_logits = logits.view(-1, logits.size(-1))
        flat_targets = targets.reshape(-1)
        if loss_reduction == "mean":
            # sum / count with count clamped to 1: the mean normally, 0 (not NaN) if nothing counts
            total = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="sum")
            return total / (flat_targets != -1).sum().clamp(min=1)
        if loss_reduction == "sum":
            return F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="sum")
        if loss_reduction == "none":
            per_token = F.cross_entropy(
                flat_logits, flat_targets, ignore_index=-1, reduction="none"
            )
            return per_token.view(B, T)
        raise ValueError(f"loss_reduction must be 'mean', 'sum' or 'none', got {loss_reduction!r}")

    def autocast_args(self, device: torch.device) -> dict:
        """torch.autocast's arguments for this model's compute dtype on device (off in fp32)."""
        dtype = self.get_compute_dtype(device)
        return dict(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32)

    def hidden_states(
        self, idx, cos_sin, kv_cache=None, attn_capture=None, attn_mask=None, residual_capture=None
    ):
        """The normed final hidden states (B, T, n_embd) of ids idx at the rotary angles cos_sin:
        the trunk that forward and the engine's compiled decode step share."""
        # Matmuls in bf16 (when that is the compute dtype) while weights, gradients and optimizer
        # state stay fp32: autocast casts at each matmul. The fp32 tables are looked up and the
        # rows cast to the compute dtype at once, so the residual stream, and everything autograd
        # saves along it, is bf16 too (half the activation memory); an fp32 lookup would keep it
        # fp32 all the way through, since x + bf16 is fp32. The gradient flows back through the
        # cast into the fp32 tables, so the optimizer still updates fp32 master weights.
        dtype = self.get_compute_dtype(idx.device)
        with torch.autocast(**self.autocast_args(idx.device)):
            x = norm(self.transformer.wte(idx).to(dtype)).to(dtype)
            for i, block in enumerate(self.transformer.h):
                ve = None
                if str(i) in self.value_embeds:
                    ve = self.value_embeds[str(i)](idx).to(dtype)
                x = block(x, cos_sin, kv_cache, attn_capture, attn_mask, ve)
                if residual_capture is not None:
                    residual_capture.append(x)
            return norm(x)

    def lens_logits(self, residual: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
        """The logit lens: fp32 logits of token_ids (..., len(token_ids)) read from a layer's
        residual stream (..., n_embd) through the final norm and lm_head, soft-capped like the
        model's own. The last layer's residual gives exactly the model's logits."""
        rows = self.lm_head.weight[token_ids]  # only the tokens asked for: no vocabulary matmul
        with torch.autocast(**self.autocast_args(residual.device)):
            logits = F.linear(norm(residual), rows)
        logits = logits.float()
        if self.config.softcap:
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits

    def _head_logits(self, x: torch.Tensor, autocast: dict) -> torch.Tensor:
        """Soft-capped fp32 logits of the final hidden states x (..., n_embd)."""
        with torch.autocast(**autocast):
            logits = self.lm_head(x)
        logits = logits.float()  # the softcap and the loss in fp32: tanh and logsumexp need it
        if self.config.softcap:
            # Logit soft-cap: c tanh(z / c) is z for small logits and bounds them smoothly to
            # (-c, c), so the model cannot grow over-confident logits to push the loss down.
            logits = self.config.softcap * torch.tanh(logits / self.config.softcap)
        return logits

    def setup_optimizers(self, **settings) -> list:
        """[AdamW, Muon] for this model: optim.build_optimizers, whose keyword settings (lrs, weight
        decay, betas, momentum) and defaults these are. Under torchrun do NOT wrap the model in DDP:
        step() averages the gradients; clip with optim.clip_grad_norm_(optimizers, max_norm)."""
        return build_optimizers(self, **settings)


def _eager_cpu(t: torch.Tensor) -> bool:
    """A real CPU tensor outside torch.compile: there, data-dependent shapes cost nothing."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


class _ChunkedHeadLoss(torch.autograd.Function):
    """lm_head + softcap + summed cross-entropy over chunks of rows, its gradients computed in the
    forward, so only one chunk's (rows, vocab) logits ever exist."""

    # At 32 x 2048 rows and a 65,536 vocabulary the float32 logits alone are 17 GB, and autograd
    # would keep them and their gradient. Computing the gradients during the forward works because
    # the loss is a scalar: the backward only has to scale them by the incoming gradient.

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
            hc = h[start : start + chunk].to(dtype)
            tc = targets[start : start + chunk]
            z = (hc @ w.t()).float()
            logits = softcap * torch.tanh(z / softcap) if softcap else z
            valid = tc != -1
            safe = tc.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe[:, None])[:, 0]) * valid).sum()
            if not need_grads:  # evaluation under no_grad: the loss only
                continue
            # d loss / d logits = softmax - onehot, 0 on ignored rows
            grad = torch.softmax(logits, dim=-1)
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
        # one gradient per forward input; targets, softcap, chunk, dtype and need_grads have none
        no_grads = (None,) * 5
        return (grad_h * grad_out).to(h_dtype), (grad_w * grad_out).to(w_dtype), *no_grads


def chunked_head_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float,
    dtype: torch.dtype,
    chunk: int = HEAD_CHUNK_ROWS,
) -> torch.Tensor:
    """Summed cross-entropy of softcap(h @ weight.T) against targets (-1 = ignored), h (N, d),
    without materialising the (N, vocab) logits (see _ChunkedHeadLoss). Matmuls run in `dtype`."""
    need_grads = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _ChunkedHeadLoss.apply(
        h, weight, targets, float(softcap or 0.0), chunk, dtype, need_grads
    )
