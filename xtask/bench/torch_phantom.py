#!/usr/bin/env python3
"""PyTorch reference benchmark of the Phantom shapes (random weights, f32, CPU).

A self-contained plain-torch model of Phantom as /work/shared/spec/PHANTOM.md §2.1-2.6 describes it
(no transformers, no official code): the InternViT-300M vision tower, pixel shuffle, vision_proj,
and the decoder LLM with phantom attention. It measures the same quantities, with the same
protocol, as `phantom-infer bench` (phantom-infer/src/cli/bench.rs):

  vision_ms_per_tile       extract_feature on one [1,3,448,448] tile, first call (no warm-up)
  vision_ms_per_tile_warm  the second call
  prefill_tokens_per_s     text-only prompt of --prompt-len ids (same LCG ids as the Rust bench),
                           full forward building the KV cache, last-token logits
  decode_tokens_per_s_<C>  prefill to context C, then max(--decode-steps, 2) single-token greedy
                           steps through the cache; the first step is a warm-up and not counted
  peak_rss_mb              ru_maxrss of this process at the end, MiB

One JSON object goes to stdout; all human text goes to stderr.

Implementation notes (what a competent PyTorch port would do; all exactly equivalent to the spec):
  * The KV cache holds the widened k' = [k || Xk(k, k^)] and v' = [v || v + Xv(v, v^)]: the phantom
    halves depend only on each token and on the fixed phantom vectors, so they are computed once per
    token instead of over the whole cache at every step (spec §2.4.6 describes the released code,
    which recomputes them: O(T·H²·d) per layer per step).
  * The key/value XAttention runs over the H_kv KV heads, not over the H GQA-expanded copies: each KV
    head appears H/H_kv times among the expanded keys and values, so the softmax weights over H
    heads sum the same terms with the same multiplicity, and every expanded copy gets the output
    of its KV head.
  * gelu(c·Wkᵀ), gelu(c·Wvᵀ) of the phantom vectors are computed once at prefill and cached.
  * GQA by reshaping the queries of each KV group into the row axis of one attention call
    ([B, H_kv, r·T, 2d]); the keys are never repeated.
  * Fused q/k/v and gate/up projections; the two gating linears fold into one Linear(2d -> 1)
    because sigmoid(g1 - g2) only needs g1 - g2.
`--check` verifies all of this against a literal, cache-free transcription of the spec.
"""

import argparse
import json
import math
import os
import resource
import sys
import time
import warnings

# The PyPI wheel warns when NumPy is absent; nothing here needs NumPy.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Configurations

VISION_300M = dict(hidden=1024, heads=16, mlp=4096, layers=24, image=448, patch=14, ln_eps=1e-6)

PRESETS = {
    # Qwen2-0.5B: q/k/v with bias, tied lm_head.
    "0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, mlp=4864, vocab=151936,
                 rms_eps=1e-6, rope_theta=1e6, tied=True, qkv_bias=True),
    # InternLM2-1.8B: no biases, untied head.
    "1.8b": dict(hidden=2048, layers=24, heads=16, kv_heads=8, mlp=8192, vocab=92553,
                 rms_eps=1e-5, rope_theta=1e6, tied=False, qkv_bias=False),
    # Phi-3-mini: no biases, untied head.
    "3.8b": dict(hidden=3072, layers=32, heads=32, kv_heads=32, mlp=8192, vocab=32064,
                 rms_eps=1e-5, rope_theta=1e4, tied=False, qkv_bias=False),
    # InternLM2.5-7B (needs ~36 GB of f32 weights; listed for completeness).
    "7b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, mlp=14336, vocab=92553,
               rms_eps=1e-5, rope_theta=1e6, tied=False, qkv_bias=False),
}


# ----------------------------------------------------------------------------------------------
# Random initialisation

class Init:
    """Deterministic random tensors with sane scales (linears ~ N(0, 1/fan_in))."""

    def __init__(self, seed):
        self.gen = torch.Generator().manual_seed(seed)

    def normal(self, shape, std):
        return torch.empty(shape).normal_(0.0, std, generator=self.gen)

    def linear(self, out_features, in_features):
        return self.normal((out_features, in_features), in_features ** -0.5)

    def bias(self, n):
        return self.normal((n,), 0.02)

    def norm(self, n):
        return 1.0 + self.normal((n,), 0.05)


def count(tensors):
    seen, total = set(), 0
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


# ----------------------------------------------------------------------------------------------
# Vision: InternViT -> drop CLS -> pixel shuffle 0.5 -> vision_proj

def pixel_shuffle(x, side):
    """[N, side*side, C] row-major grid -> [N, (side/2)², 4C]; token i·(side/2)+j concatenates
    x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]."""
    n, _, c = x.shape
    h = side // 2
    x = x.view(n, h, 2, h, 2, c)            # [n, i, a, j, b, c]
    x = x.permute(0, 1, 3, 2, 4, 5)         # [n, i, j, a, b, c]
    return x.reshape(n, h * h, 4 * c)


class Vision:
    def __init__(self, vc, llm_hidden, init):
        self.vc = vc
        c, m, p = vc["hidden"], vc["mlp"], vc["patch"]
        self.grid = vc["image"] // p
        self.patch_w = init.normal((c, 3, p, p), (3 * p * p) ** -0.5)
        self.patch_b = init.bias(c)
        self.cls = init.normal((1, 1, c), 0.02)
        self.pos = init.normal((1, self.grid * self.grid + 1, c), 0.02)
        self.layers = []
        for _ in range(vc["layers"]):
            self.layers.append(dict(
                ln1_w=init.norm(c), ln1_b=init.bias(c),
                qkv_w=init.linear(3 * c, c), qkv_b=init.bias(3 * c),
                proj_w=init.linear(c, c), proj_b=init.bias(c),
                ls1=0.1 + init.normal((c,), 0.01),
                ln2_w=init.norm(c), ln2_b=init.bias(c),
                fc1_w=init.linear(m, c), fc1_b=init.bias(m),
                fc2_w=init.linear(c, m), fc2_b=init.bias(c),
                ls2=0.1 + init.normal((c,), 0.01),
            ))
        d4 = 4 * c
        self.proj = dict(ln_w=init.norm(d4), ln_b=init.bias(d4),
                         w1=init.linear(llm_hidden, d4), b1=init.bias(llm_hidden),
                         w3=init.linear(llm_hidden, llm_hidden), b3=init.bias(llm_hidden))

    def tensors(self):
        yield from (self.patch_w, self.patch_b, self.cls, self.pos)
        for layer in self.layers:
            yield from layer.values()
        yield from self.proj.values()

    def tower(self, pixels, attention=None):
        vc = self.vc
        c, heads, eps = vc["hidden"], vc["heads"], vc["ln_eps"]
        hd = c // heads
        x = F.conv2d(pixels, self.patch_w, self.patch_b, stride=vc["patch"])  # [N, C, g, g]
        n = x.shape[0]
        x = x.flatten(2).transpose(1, 2)                                        # [N, g*g, C]
        x = torch.cat([self.cls.expand(n, -1, -1), x], dim=1) + self.pos
        seq = x.shape[1]
        for ly in self.layers:
            h = F.layer_norm(x, (c,), ly["ln1_w"], ly["ln1_b"], eps)
            qkv = F.linear(h, ly["qkv_w"], ly["qkv_b"]).view(n, seq, 3, heads, hd)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)                     # [N, heads, S, hd]
            if attention is None:
                a = F.scaled_dot_product_attention(q, k, v)
            else:
                a = attention(q, k, v)
            a = a.transpose(1, 2).reshape(n, seq, c)
            x = x + ly["ls1"] * F.linear(a, ly["proj_w"], ly["proj_b"])
            h = F.layer_norm(x, (c,), ly["ln2_w"], ly["ln2_b"], eps)
            x = x + ly["ls2"] * F.linear(F.gelu(F.linear(h, ly["fc1_w"], ly["fc1_b"])),
                                         ly["fc2_w"], ly["fc2_b"])
        return x

    def extract_feature(self, pixels):
        """[N, 3, S, S] -> [N, (S/28)², llm_hidden] vision tokens."""
        x = self.tower(pixels)[:, 1:]                                           # drop CLS
        x = pixel_shuffle(x, self.grid)
        pr = self.proj
        x = F.layer_norm(x, (x.shape[-1],), pr["ln_w"], pr["ln_b"], 1e-5)
        x = F.gelu(F.linear(x, pr["w1"], pr["b1"]))
        return F.linear(x, pr["w3"], pr["b3"])


# ----------------------------------------------------------------------------------------------
# Decoder with phantom attention

def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Cache:
    """Per layer: widened k', v' [B, Hkv, capacity, 2d] and the phantom key/value projections."""

    def __init__(self, cfg, batch, capacity):
        d, hkv = cfg["head_dim"], cfg["kv_heads"]
        self.k = [torch.empty(batch, hkv, capacity, 2 * d) for _ in range(cfg["layers"])]
        self.v = [torch.empty(batch, hkv, capacity, 2 * d) for _ in range(cfg["layers"])]
        self.phantom = [None] * cfg["layers"]
        self.len = 0
        self.capacity = capacity


class Decoder:
    def __init__(self, cfg, init, eta=1e-4):
        self.cfg = cfg
        self.eta = eta
        dm, d, h, hkv, m, v = (cfg["hidden"], cfg["head_dim"], cfg["heads"], cfg["kv_heads"],
                               cfg["mlp"], cfg["vocab"])
        self.embed = init.normal((v, dm), 1.0)
        self.layers = []
        for _ in range(cfg["layers"]):
            wq, wk, wv = init.linear(h * d, dm), init.linear(hkv * d, dm), init.linear(hkv * d, dm)
            if cfg["qkv_bias"]:
                bqkv = init.bias((h + 2 * hkv) * d)
            else:
                bqkv = None
            g1_w, g1_b, g2_w, g2_b = init.linear(1, d), init.bias(1), init.linear(1, d), init.bias(1)
            ly = dict(
                ln1=init.norm(dm),
                qkv_w=torch.cat([wq, wk, wv], 0), qkv_b=bqkv,
                o_w=init.linear(dm, h * d),
                # XAttention modules: linear_q, linear_k, linear_v, linear_o, each [d, d], no bias.
                xq=[init.linear(d, d) for _ in range(4)],
                xk=[init.linear(d, d) for _ in range(4)],
                xv=[init.linear(d, d) for _ in range(4)],
                g1_w=g1_w, g1_b=g1_b, g2_w=g2_w, g2_b=g2_b,
                # sigmoid(g1 - g2) = sigmoid([o1 || o2]·[w1 || -w2] + (b1 - b2)): one Linear(2d -> 1).
                gate_w=torch.cat([g1_w, -g2_w], 1), gate_b=g1_b - g2_b,
                ln2=init.norm(dm),
                gu_w=torch.cat([init.linear(m, dm), init.linear(m, dm)], 0),
                down_w=init.linear(dm, m),
            )
            self.layers.append(ly)
        self.norm = init.norm(dm)
        self.lm_head = self.embed if cfg["tied"] else init.linear(v, dm)
        # RoPE tables (rotate-half convention, inv_freq in f32).
        inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self._inv_freq = inv_freq
        self._rope_len = 0
        self._ensure_rope(4096)

    def _ensure_rope(self, n):
        if n <= self._rope_len:
            return
        n = max(n, 2 * self._rope_len)
        t = torch.arange(n, dtype=torch.float32)
        freqs = torch.outer(t, self._inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        # Tables in f32, applied in the model's dtype.
        dtype = torch.get_default_dtype()
        self.cos, self.sin = emb.cos().to(dtype), emb.sin().to(dtype)
        self._rope_len = n

    def tensors(self):
        """The parameters a checkpoint holds (the fused gate linear is derived, not counted)."""
        yield self.embed
        for ly in self.layers:
            yield from (ly["ln1"], ly["qkv_w"], ly["qkv_b"], ly["o_w"], *ly["xq"], *ly["xk"],
                        *ly["xv"], ly["g1_w"], ly["g1_b"], ly["g2_w"], ly["g2_b"], ly["ln2"],
                        ly["gu_w"], ly["down_w"])
        yield self.norm
        yield self.lm_head

    def _xattn(self, a, w, kc, vc):
        """XAttention across heads: a [B,T,Hh,d], kc/vc = gelu(c·Wkᵀ)/gelu(c·Wvᵀ) [B,1,Hh,d].
        Returns η·gelu((softmax(gelu(a·Wqᵀ)·kcᵀ/√d)·vc)·Woᵀ)."""
        d = a.shape[-1]
        aq = F.gelu(F.linear(a, w[0]))
        s = torch.matmul(aq, kc.transpose(-1, -2)) * (d ** -0.5)            # [B,T,Hh,Hh]
        y = torch.matmul(torch.softmax(s, dim=-1), vc)                      # [B,T,Hh,d]
        return self.eta * F.gelu(F.linear(y, w[3]))

    def _layer(self, li, x, cache, pos):
        cfg = self.cfg
        ly = self.layers[li]
        b, t, _ = x.shape
        d, h, hkv = cfg["head_dim"], cfg["heads"], cfg["kv_heads"]
        r = h // hkv

        hs = rms_norm(x, ly["ln1"], cfg["rms_eps"])
        qkv = F.linear(hs, ly["qkv_w"], ly["qkv_b"])
        q, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, t, h, d)
        k = k.view(b, t, hkv, d)
        v = v.view(b, t, hkv, d)
        cos = self.cos[pos:pos + t].view(1, t, 1, d)
        sin = self.sin[pos:pos + t].view(1, t, 1, d)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin

        ph = cache.phantom[li]
        if ph is None:
            # Phantom vectors: the first (non-padding) token, post-RoPE. Only gelu(c·Wkᵀ) and
            # gelu(c·Wvᵀ) of them are ever used, so those are what the cache keeps.
            assert pos == 0, "the phantom vectors come from the first prompt token"
            ph = {}
            for name, src in (("q", q), ("k", k), ("v", v)):
                c = src[:, :1]
                w = ly["x" + name]
                ph[name] = (F.gelu(F.linear(c, w[1])), F.gelu(F.linear(c, w[2])))
            cache.phantom[li] = ph

        q2 = torch.cat([q, self._xattn(q, ly["xq"], *ph["q"])], dim=-1)          # [B,T,H,2d]
        k2 = torch.cat([k, self._xattn(k, ly["xk"], *ph["k"])], dim=-1)          # [B,T,Hkv,2d]
        v2 = torch.cat([v, v + self._xattn(v, ly["xv"], *ph["v"])], dim=-1)

        end = pos + t
        cache.k[li][:, :, pos:end] = k2.transpose(1, 2)
        cache.v[li][:, :, pos:end] = v2.transpose(1, 2)
        keys = cache.k[li][:, :, :end]
        vals = cache.v[li][:, :, :end]

        # GQA: the r query heads of a KV group become r·T rows of one attention call.
        qg = q2.view(b, t, hkv, r, 2 * d).permute(0, 2, 3, 1, 4).reshape(b, hkv, r * t, 2 * d)
        if t == 1:
            mask = None
        else:
            qpos = torch.arange(pos, end).repeat(r)                               # row -> position
            mask = torch.arange(end).view(1, end) <= qpos.view(r * t, 1)
        o = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=mask, scale=d ** -0.5)
        o = o.view(b, hkv, r, t, 2 * d).permute(0, 3, 1, 2, 4).reshape(b, t, h, 2 * d)

        # Fold: w = sigmoid(g1 - g2); out = w·o1 + (1-w)·o2.
        w = torch.sigmoid(F.linear(o, ly["gate_w"], ly["gate_b"]))
        o1, o2 = o[..., :d], o[..., d:]
        out = torch.addcmul(o2, w, o1 - o2).reshape(b, t, h * d)
        x = x + F.linear(out, ly["o_w"])

        hs = rms_norm(x, ly["ln2"], cfg["rms_eps"])
        gate, up = F.linear(hs, ly["gu_w"]).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, ly["down_w"])

    def forward(self, ids, cache, all_logits=False):
        """ids [B, T] appended at cache.len; returns logits [B, V] of the last token
        (or [B, T, V] with all_logits)."""
        pos = cache.len
        t = ids.shape[1]
        if pos + t > cache.capacity:
            raise ValueError(f"cache capacity {cache.capacity} exceeded ({pos} + {t})")
        self._ensure_rope(pos + t)
        x = F.embedding(ids, self.embed)
        for li in range(len(self.layers)):
            x = self._layer(li, x, cache, pos)
        cache.len = pos + t
        if not all_logits:
            x = x[:, -1]
        return F.linear(rms_norm(x, self.norm, self.cfg["rms_eps"]), self.lm_head)


# ----------------------------------------------------------------------------------------------
# Literal spec transcription (no cache, GQA-expanded heads, separate gating linears): --check only

def reference_logits(dec, ids, plain=False):
    cfg = dec.cfg
    d, h, hkv = cfg["head_dim"], cfg["heads"], cfg["kv_heads"]
    r = h // hkv
    b, t = ids.shape
    eta = dec.eta
    dec._ensure_rope(t)
    cos, sin = dec.cos[:t].view(1, t, 1, d), dec.sin[:t].view(1, t, 1, d)

    def xattn(a, c, w):                      # a [B,T,H,d], c [B,1,H,d]
        aq = F.gelu(a @ w[0].T)
        kk = F.gelu(c @ w[1].T)
        vv = F.gelu(c @ w[2].T)
        s = torch.einsum("btid,bjd->btij", aq, kk[:, 0]) / math.sqrt(d)
        y = torch.einsum("btij,bjd->btid", torch.softmax(s, -1), vv[:, 0])
        return eta * F.gelu(y @ w[3].T)

    x = dec.embed[ids]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for ly in dec.layers:
        hs = rms_norm(x, ly["ln1"], cfg["rms_eps"])
        wq, wk, wv = ly["qkv_w"].split([h * d, hkv * d, hkv * d], 0)
        if ly["qkv_b"] is not None:
            bq, bk, bv = ly["qkv_b"].split([h * d, hkv * d, hkv * d], 0)
        else:
            bq = bk = bv = 0.0
        q = (hs @ wq.T + bq).view(b, t, h, d)
        k = (hs @ wk.T + bk).view(b, t, hkv, d)
        v = (hs @ wv.T + bv).view(b, t, hkv, d)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(r, dim=2)    # query head h uses KV head h // r
        v = v.repeat_interleave(r, dim=2)
        if plain:
            qs, ks, vs = q, k, v
        else:
            qs = torch.cat([q, xattn(q, q[:, :1], ly["xq"])], -1)
            ks = torch.cat([k, xattn(k, k[:, :1], ly["xk"])], -1)
            vs = torch.cat([v, v + xattn(v, v[:, :1], ly["xv"])], -1)
        s = torch.einsum("bqhe,bkhe->bhqk", qs, ks) / math.sqrt(d)
        s = s.masked_fill(~causal, float("-inf"))
        o = torch.einsum("bhqk,bkhe->bqhe", torch.softmax(s, -1), vs)
        if plain:
            out = o
        else:
            o1, o2 = o[..., :d], o[..., d:]
            g1 = o1 @ ly["g1_w"].T + ly["g1_b"]
            g2 = o2 @ ly["g2_w"].T + ly["g2_b"]
            wgt = torch.exp(g1) / (torch.exp(g1) + torch.exp(g2))
            out = wgt * o1 + (1 - wgt) * o2
        x = x + out.reshape(b, t, h * d) @ ly["o_w"].T
        hs = rms_norm(x, ly["ln2"], cfg["rms_eps"])
        gate, up = (hs @ ly["gu_w"].T).chunk(2, -1)
        x = x + (F.silu(gate) * up) @ ly["down_w"].T
    return rms_norm(x, dec.norm, cfg["rms_eps"]) @ dec.lm_head.T


def run_check():
    torch.manual_seed(0)
    worst = 0.0
    ok = True

    def report(name, diff, scale, tol=1e-4):
        nonlocal worst, ok
        worst = max(worst, diff)
        good = diff <= tol
        ok &= good
        log(f"check {name}: max |diff| {diff:.3e} (logit scale {scale:.2f}) {'ok' if good else 'FAIL'}")

    # Vision: pixel shuffle order and the SDPA tower against explicit softmax attention.
    x = torch.randn(2, 8 * 8, 5)
    ps = pixel_shuffle(x, 8)
    g = x.view(2, 8, 8, 5)
    lit = torch.stack([torch.cat([g[:, 2 * i, 2 * j], g[:, 2 * i, 2 * j + 1], g[:, 2 * i + 1, 2 * j],
                                  g[:, 2 * i + 1, 2 * j + 1]], -1)
                       for i in range(4) for j in range(4)], 1)
    report("pixel_shuffle", (ps - lit).abs().max().item(), lit.abs().max().item(), 0.0)
    vc = dict(hidden=32, heads=4, mlp=64, layers=2, image=56, patch=14, ln_eps=1e-6)
    vis = Vision(vc, 24, Init(3))
    px = torch.randn(2, 3, 56, 56)

    def explicit(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v

    a, b = vis.tower(px), vis.tower(px, attention=explicit)
    report("vision tower", (a - b).abs().max().item(), b.abs().max().item())
    assert vis.extract_feature(px).shape == (2, 4, 24)

    # Decoder: cached greedy decode vs full recompute of the literal spec.
    cases = [
        ("gqa r=2, eta=1e-4", dict(heads=4, kv_heads=2, qkv_bias=True, tied=True), 1e-4),
        ("gqa r=2, eta=0.5", dict(heads=4, kv_heads=2, qkv_bias=True, tied=True), 0.5),
        ("gqa r=3, eta=1.0", dict(heads=6, kv_heads=2, qkv_bias=False, tied=False), 1.0),
        ("mha, eta=0.5", dict(heads=4, kv_heads=4, qkv_bias=False, tied=False), 0.5),
    ]
    for name, extra, eta in cases:
        cfg = dict(hidden=64, layers=3, head_dim=16, mlp=96, vocab=101, rms_eps=1e-6,
                   rope_theta=1e4, **extra)
        dec = Decoder(cfg, Init(7), eta=eta)
        prompt, steps = 9, 7
        ids = torch.randint(0, cfg["vocab"], (2, prompt))
        cache = Cache(cfg, 2, prompt + steps)
        step_logits = [dec.forward(ids, cache)]
        seq = ids
        for _ in range(steps - 1):
            nxt = step_logits[-1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            step_logits.append(dec.forward(nxt, cache))
        cached = torch.stack(step_logits, 1)                    # logits at positions prompt-1..
        full = reference_logits(dec, seq)[:, prompt - 1:]
        report(name, (cached - full).abs().max().item(), full.abs().max().item())
        # Batched prefill logits at every position, too.
        c2 = Cache(cfg, 2, seq.shape[1])
        allpos = dec.forward(seq, c2, all_logits=True)
        report(name + " (prefill, all positions)",
               (allpos - reference_logits(dec, seq)).abs().max().item(), full.abs().max().item())

    # eta = 0: phantom attention is exactly plain attention (spec §2.4.7).
    cfg = dict(hidden=64, layers=2, head_dim=16, mlp=96, vocab=101, rms_eps=1e-6, rope_theta=1e4,
               heads=4, kv_heads=2, qkv_bias=True, tied=True)
    dec = Decoder(cfg, Init(11), eta=0.0)
    seq = torch.randint(0, 101, (1, 12))
    a = dec.forward(seq, Cache(cfg, 1, 12), all_logits=True)
    b = reference_logits(dec, seq, plain=True)
    report("eta=0 == plain attention", (a - b).abs().max().item(), b.abs().max().item())

    log("check:", "PASSED" if ok else "FAILED")
    print(json.dumps({"check": "passed" if ok else "failed", "max_abs_diff": worst}))
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# Benchmark

class ForeignLoad:
    """CPU time other processes used while the benchmark ran, in cores (Linux /proc/stat).
    On a small machine any other load skews OpenMP timings badly, so the report carries it."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            busy = sum(fields) - fields[3] - fields[4]          # all but idle and iowait
            busy_s = busy / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None
        r = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy_s, r.ru_utime + r.ru_stime

    def cores(self):
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return round(max(other, 0.0) / wall, 3)


def random_ids(n, vocab, seed):
    """The Rust bench's LCG (phantom-infer/src/cli/bench.rs), so both run on the same ids."""
    mask = (1 << 64) - 1
    a, c = 6364136223846793005, 1442695040888963407
    state = (seed * a + c) & mask
    out = []
    for _ in range(n):
        state = (state * a + c) & mask
        out.append((state >> 33) % (vocab - 1000) + 500)
    return torch.tensor([out], dtype=torch.long)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="0.5b", choices=sorted(PRESETS))
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=16,
                    help="decode steps per context; the first is a warm-up and not counted")
    ap.add_argument("--contexts", default="128,1024")
    ap.add_argument("--no-vision", action="store_true", help="skip the vision-tower measurement")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ttft", action="store_true",
                    help="also time the first token of a 1-tile and a 6-tile question")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="precision of the weights and the arithmetic")
    ap.add_argument("--check", action="store_true",
                    help="tiny-config correctness self-check instead of the benchmark")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_default_dtype(getattr(torch, args.dtype))
    if args.check:
        with torch.inference_mode():
            return run_check()

    contexts = [int(c) for c in args.contexts.split(",") if c]
    cfg = dict(PRESETS[args.size])
    cfg["head_dim"] = cfg["hidden"] // cfg["heads"]

    foreign = ForeignLoad()
    with torch.inference_mode():
        t0 = time.perf_counter()
        init = Init(0)
        vision = Vision(VISION_300M, cfg["hidden"], init)
        dec = Decoder(cfg, init)
        params_vision = count(vision.tensors())
        params_decoder = count(dec.tensors())
        log(f"{args.size}: built random model in {time.perf_counter() - t0:.1f} s "
            f"(decoder {params_decoder / 1e6:.1f} M, vision {params_vision / 1e6:.1f} M params), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")
        report = {"size": args.size, "device": "cpu", "torch": torch.__version__,
                  "dtype": args.dtype,
                  "threads": torch.get_num_threads(),
                  # Other load on the machine skews OpenMP timings badly (barrier waits).
                  "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
                  "params_decoder": params_decoder, "params_vision": params_vision}

        if not args.no_vision:
            side = VISION_300M["image"]
            tile = torch.randn(1, 3, side, side)
            for key in ("vision_ms_per_tile", "vision_ms_per_tile_warm"):
                t0 = time.perf_counter()
                tokens = vision.extract_feature(tile)
                report[key] = (time.perf_counter() - t0) * 1e3
                log(f"{key}: {report[key]:.0f} ms -> {tuple(tokens.shape)}")

        ids = random_ids(args.prompt_len, cfg["vocab"], 1)
        cache = Cache(cfg, 1, args.prompt_len)
        t0 = time.perf_counter()
        dec.forward(ids, cache)
        dt = time.perf_counter() - t0
        report["prefill_tokens"] = args.prompt_len
        report["prefill_tokens_per_s"] = args.prompt_len / dt
        log(f"prefill {args.prompt_len} tokens: {dt * 1e3:.0f} ms "
            f"({report['prefill_tokens_per_s']:.1f} tok/s)")
        del cache

        if args.ttft:
            # A question about a picture: 256 tokens per tile plus about 30 of text; the vision
            # tower on 1 and on 7 tiles (6 and the thumbnail), then the prompt.
            side = VISION_300M["image"]
            for key, tiles, n in (("ttft_1_tile_s", 1, 286), ("ttft_6_tile_s", 7, 1822)):
                t0 = time.perf_counter()
                vision.extract_feature(torch.randn(tiles, 3, side, side))
                t1 = time.perf_counter()
                cache = Cache(cfg, 1, n)
                dec.forward(random_ids(n, cfg["vocab"], n), cache)
                t2 = time.perf_counter()
                report[key] = t2 - t0
                report[f"prefill_tokens_per_s_{n}"] = n / (t2 - t1)
                log(f"{key}: {report[key]:.1f} s")
                del cache

        steps = max(args.decode_steps, 2)
        for ctx in contexts:
            cache = Cache(cfg, 1, ctx + steps)
            dec.forward(random_ids(ctx, cfg["vocab"], ctx), cache)
            token = torch.tensor([[1000]])
            counted = 0.0
            for step in range(steps):
                t0 = time.perf_counter()
                logits = dec.forward(token, cache)
                token = logits.argmax(-1, keepdim=True)
                _ = token.item()
                if step > 0:
                    counted += time.perf_counter() - t0
            report[f"decode_tokens_per_s_{ctx}"] = (steps - 1) / counted
            log(f"decode at context {ctx}: {(steps - 1)} steps in {counted * 1e3:.0f} ms "
                f"({report[f'decode_tokens_per_s_{ctx}']:.2f} tok/s)")
            del cache
        report["decode_steps_counted"] = steps - 1
        report["weight_bytes_per_token"] = params_decoder * (4 if args.dtype == "float32" else 2)
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # Mean CPU cores used by other processes during the run; near 0 for a trustworthy number.
    report["other_processes_cpu_cores"] = foreign.cores()
    if (report["other_processes_cpu_cores"] or 0) > 0.1:
        log(f"warning: other processes used {report['other_processes_cpu_cores']} CPU cores on "
            f"average during the run; the timings are skewed")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
