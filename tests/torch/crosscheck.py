#!/usr/bin/env python3
"""kvkit's CPU ops against PyTorch and Hugging Face transformers.

An independent reference for the formulas: the RoPE frequency tables and
scalings (transformers' ROPE_INIT_FUNCTIONS), the rotation pairing (Llama's
apply_rotary_pos_emb; DeepSeek-V3's interleaved variant), MoE routing
(transformers' DeepSeek-V2 and V3 routers; Mixtral/Qwen softmax-top-k in torch)
GQA decode attention (float64 torch), MLA (transformers' DeepseekV3Attention
against kvkit's compress + absorbed decode) and the gpt_decode example's
reading of llama2.c checkpoints (against transformers' LlamaForCausalLM). kvkit is reached through ctypes
(kvkit_capi.cpp, built as a shared library).

Usage: crosscheck.py path/to/libkvkit_capi.so
Exit 0: all agree; 1: a mismatch; 77: torch, numpy or transformers missing
(CTest reports the test skipped).
"""
import ctypes
import math
import os
import sys

try:
    import numpy as np
    import torch
    import transformers
except ImportError as e:  # CI machines have no torch
    print(f"skipped: {e}")
    sys.exit(77)

torch.manual_seed(0)
RNG = np.random.default_rng(0)
FAILURES = []


def report(name, err, tol):
    ok = err <= tol
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max error {err:.3g} (tolerance {tol:.3g})")
    if not ok:
        FAILURES.append(name)


def ptr(a, ctype):
    return a.ctypes.data_as(ctypes.POINTER(ctype))


class Kvkit:
    def __init__(self, path):
        self.lib = ctypes.CDLL(os.path.abspath(path))
        self.lib.kvkit_last_error.restype = ctypes.c_char_p

    def call(self, name, *args):
        if getattr(self.lib, name)(*args) != 0:
            raise RuntimeError(f"{name}: {self.lib.kvkit_last_error().decode()}")

    # scaling: 0 none, 1 linear, 2 NTK static, 3 NTK dynamic, 4 YaRN, 5 Llama-3.1
    @staticmethod
    def extra(rope):
        return np.array([rope.get("beta_fast", 32.0), rope.get("beta_slow", 1.0), rope.get("mscale", 0.0),
                         rope.get("mscale_all_dim", 0.0), rope.get("low_freq_factor", 1.0),
                         rope.get("high_freq_factor", 4.0), 1.0 if rope.get("truncate", True) else 0.0])

    def inv_freq(self, rotary_dim, base, scaling, factor=1.0, original=0, rope=None, seq_len=0):
        out = np.zeros(rotary_dim // 2)
        af = ctypes.c_double()
        self.call("kvkit_rope_inv_freq", rotary_dim, rotary_dim, ctypes.c_double(base), scaling,
                  ctypes.c_double(factor), ctypes.c_int64(original), ptr(self.extra(rope or {}), ctypes.c_double),
                  ctypes.c_int64(seq_len), ptr(out, ctypes.c_double), ctypes.byref(af))
        return out, af.value

    def apply_rope(self, x, positions, base, style, scaling=0, factor=1.0, original=0, rope=None):
        x = np.ascontiguousarray(x, dtype=np.float32).copy()
        tokens, heads, dim = x.shape
        pos = np.ascontiguousarray(positions, dtype=np.int64)
        self.call("kvkit_apply_rope", dim, dim, ctypes.c_double(base), style, scaling, ctypes.c_double(factor),
                  ctypes.c_int64(original), ptr(self.extra(rope or {}), ctypes.c_double),
                  ctypes.c_int64(int(pos.max()) + 1), ptr(pos, ctypes.c_int64), ctypes.c_int64(tokens), heads,
                  ptr(x, ctypes.c_float))
        return x

    def route(self, logits, top_k, scoring, n_group=1, topk_group=1, group_score=0, renormalize=False,
              scale=1.0, bias=None):
        logits = np.ascontiguousarray(logits, dtype=np.float32)
        tokens, n = logits.shape
        ids = np.zeros((tokens, top_k), dtype=np.int32)
        w = np.zeros((tokens, top_k), dtype=np.float32)
        b = None if bias is None else ptr(np.ascontiguousarray(bias, dtype=np.float32), ctypes.c_float)
        self.call("kvkit_moe_route", n, top_k, scoring, n_group, topk_group, group_score, int(renormalize),
                  ctypes.c_float(scale), ptr(logits, ctypes.c_float), b, ctypes.c_int64(tokens),
                  ptr(ids, ctypes.c_int32), ptr(w, ctypes.c_float))
        return ids, w

    def decode(self, q, k_pages, v_pages, table, lens, sm_scale, window=0, sinks=0, softcap=0.0):
        batch, q_heads, dim = q.shape
        pages, page_size, kv_heads, _ = k_pages.shape
        o = np.zeros_like(q)
        lse = np.zeros((batch, q_heads), dtype=np.float32)
        self.call("kvkit_decode", ptr(q, ctypes.c_float), ptr(k_pages, ctypes.c_float),
                  ptr(v_pages, ctypes.c_float), ctypes.c_int64(pages), page_size, kv_heads, dim, q_heads,
                  ptr(table, ctypes.c_int32), ptr(lens, ctypes.c_int32), ctypes.c_int64(batch),
                  ctypes.c_int64(table.shape[1]), ctypes.c_float(sm_scale), window, sinks,
                  ctypes.c_float(softcap), ptr(o, ctypes.c_float), ptr(lse, ctypes.c_float))
        return o, lse


# ---------------------------------------------------------------- RoPE
def hf_rope_init(rope_type, params, head_dim, max_pos=131072, seq_len=None):
    """transformers' (inv_freq, attention_factor) for a Llama config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rp = dict(params, rope_type=rope_type)
    cfg = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                      max_position_embeddings=max_pos, rope_parameters=rp)
    fn = ROPE_INIT_FUNCTIONS[rope_type]
    inv, af = fn(cfg, "cpu", seq_len) if seq_len is not None else fn(cfg, "cpu")
    return inv.double().numpy(), float(af)


def check_rope_tables(kv):
    d = 128
    cases = [
        # name, HF rope_type, HF params, kvkit scaling, factor, original, extra
        ("linear x4", "linear", {"rope_theta": 10000.0, "factor": 4.0}, 1, 4.0, 0, {}),
        ("llama3.1", "llama3", {"rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
         5, 8.0, 8192, {"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
        ("yarn qwen x4", "yarn", {"rope_theta": 1000000.0, "factor": 4.0,
                                  "original_max_position_embeddings": 32768},
         4, 4.0, 32768, {}),
        ("yarn deepseek x40", "yarn", {"rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                       "mscale": 1.0, "mscale_all_dim": 1.0,
                                       "original_max_position_embeddings": 4096},
         4, 40.0, 4096, {"mscale": 1.0, "mscale_all_dim": 1.0}),
        ("yarn mscale 0.707", "yarn", {"rope_theta": 10000.0, "factor": 16.0, "mscale": 0.707,
                                       "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096},
         4, 16.0, 4096, {"mscale": 0.707, "mscale_all_dim": 1.0}),
    ]
    for name, rope_type, params, scaling, factor, original, extra in cases:
        try:
            want, want_af = hf_rope_init(rope_type, params, d, max_pos=int(factor * max(original, 4096)))
        except Exception as e:  # a transformers version without this API
            print(f"FAIL rope table {name}: transformers raised {type(e).__name__}: {e}")
            FAILURES.append(f"rope table {name}")
            continue
        got, got_af = kv.inv_freq(d, params["rope_theta"], scaling, factor, original, extra)
        # transformers computes inv_freq in float32 (base ** (arange / d) in float, then int64 -> float):
        # 1e-6 relative covers that rounding.
        report(f"rope inv_freq {name}", float(np.max(np.abs(got - want) / want)), 2e-6)
        report(f"rope attention_factor {name}", abs(got_af - want_af), 1e-6)
    # Dynamic NTK at 3x the original context (HF grows the base from seq_len).
    try:
        want, _ = hf_rope_init("dynamic", {"rope_theta": 10000.0, "factor": 2.0}, d, max_pos=4096, seq_len=12288)
        got, _ = kv.inv_freq(d, 10000.0, 3, 2.0, 4096, {}, seq_len=12288)
        report("rope inv_freq dynamic NTK x2 at 12288", float(np.max(np.abs(got - want) / want)), 2e-6)
    except Exception as e:
        print(f"FAIL rope dynamic: {type(e).__name__}: {e}")
        FAILURES.append("rope dynamic")


def check_rope_apply(kv):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    tokens, heads, d = 37, 4, 128
    x = RNG.standard_normal((tokens, heads, d)).astype(np.float32)
    pos = RNG.integers(0, 5000, tokens)
    pos[0] = 0
    for name, base in (("neox (Llama)", 500000.0),):
        got = kv.apply_rope(x, pos, base, style=0)
        inv = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.outer(pos, inv)  # float64 angles: kvkit's table is accurate to float rounding
        emb = np.concatenate([ang, ang], axis=-1)
        cos = torch.from_numpy(np.cos(emb))[None]  # [1, tokens, d]
        sin = torch.from_numpy(np.sin(emb))[None]
        xt = torch.from_numpy(x.astype(np.float64)).permute(1, 0, 2)[None]  # [1, heads, tokens, d]
        want, _ = apply_rotary_pos_emb(xt, xt, cos, sin)
        want = want[0].permute(1, 0, 2).numpy()
        report(f"rope apply {name} vs transformers' apply_rotary_pos_emb", float(np.max(np.abs(got - want))), 2e-5)
    # DeepSeek: kvkit rotates interleaved pairs in place (the official order);
    # transformers' DeepSeek-V3 de-interleaves, then rotates half: the same
    # numbers in another order. kvkit's output, de-interleaved, must equal it.
    try:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave
    except ImportError as e:
        print(f"FAIL deepseek interleave: {e}")
        FAILURES.append("deepseek interleave import")
        return
    d = 64
    x = RNG.standard_normal((tokens, 1, d)).astype(np.float32)
    got = kv.apply_rope(x, pos, 10000.0, style=1)
    inv = 1.0 / 10000.0 ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.outer(pos, inv)
    emb = np.concatenate([ang, ang], axis=-1)
    cos = torch.from_numpy(np.cos(emb))[None]
    sin = torch.from_numpy(np.sin(emb))[None]
    xt = torch.from_numpy(x.astype(np.float64)).permute(1, 0, 2)[None]
    want, _ = apply_rotary_pos_emb_interleave(xt, xt, cos, sin)
    want = want[0].permute(1, 0, 2).numpy()
    deinterleaved = np.concatenate([got[..., 0::2], got[..., 1::2]], axis=-1)
    report("rope apply interleaved (DeepSeek) vs transformers' apply_rotary_pos_emb_interleave, de-interleaved",
           float(np.max(np.abs(deinterleaved - want))), 2e-5)


# ---------------------------------------------------------------- MoE
def check_moe(kv):
    tokens = 64
    # Mixtral / Qwen3: softmax over all experts in float32, top-k, renormalize.
    for name, n, k, renorm in (("mixtral", 8, 2, True), ("qwen3-moe", 128, 8, True), ("qwen2-moe", 60, 4, False)):
        logits = RNG.standard_normal((tokens, n)).astype(np.float32) * 2
        ids, w = kv.route(logits, k, 0, renormalize=renorm)
        probs = torch.softmax(torch.from_numpy(logits), dim=-1, dtype=torch.float32)
        tw, ti = torch.topk(probs, k, dim=-1)
        if renorm:
            tw = tw / tw.sum(dim=-1, keepdim=True)
        same = np.array_equal(np.sort(ids, axis=1), np.sort(ti.numpy(), axis=1))
        report(f"moe {name} ids (as sets) vs torch softmax+topk", 0.0 if same else 1.0, 0.0)
        order = np.argsort(ids, axis=1)
        torder = np.argsort(ti.numpy(), axis=1)
        err = np.max(np.abs(np.take_along_axis(w, order, 1) - np.take_along_axis(tw.numpy(), torder, 1)))
        report(f"moe {name} weights", float(err), 1e-6)

    # DeepSeek-V2 and V3 through transformers' own routers, fed the logits
    # through an identity gate weight (exact in float32).
    try:
        from transformers import DeepseekV2Config, DeepseekV3Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    except ImportError as e:
        print(f"FAIL deepseek router import: {e}")
        FAILURES.append("deepseek router import")
        return

    def hf_route(router, logits, bias=None):
        with torch.no_grad():
            router.weight.copy_(torch.eye(logits.shape[1]))
            if bias is not None:
                router.e_score_correction_bias.copy_(torch.from_numpy(bias))
            _, tw, ti = router(torch.from_numpy(logits))
        return ti.numpy(), tw.float().numpy()

    def compare(name, ids, w, ti, tw):
        same = np.array_equal(np.sort(ids, axis=1), np.sort(ti, axis=1))
        report(f"moe {name} ids (as sets) vs transformers' router", 0.0 if same else 1.0, 0.0)
        if same:
            order, torder = np.argsort(ids, axis=1), np.argsort(ti, axis=1)
            err = np.max(np.abs(np.take_along_axis(w, order, 1) - np.take_along_axis(tw, torder, 1)))
            report(f"moe {name} weights", float(err), 4e-6)

    n, k, groups, keep = 160, 6, 8, 3
    cfg = DeepseekV2Config(hidden_size=n, n_routed_experts=n, num_experts_per_tok=k, n_group=groups,
                           topk_group=keep, topk_method="group_limited_greedy", routed_scaling_factor=16.0)
    logits = RNG.standard_normal((tokens, n)).astype(np.float32) * 2
    ti, tw = hf_route(DeepseekV2TopkRouter(cfg), logits)
    ids, w = kv.route(logits, k, 0, groups, keep, 0, False, 16.0)
    compare("deepseek-v2 (group max, x16)", ids, w, ti, tw)

    n, k, groups, keep = 256, 8, 8, 4
    cfg = DeepseekV3Config(hidden_size=n, n_routed_experts=n, num_experts_per_tok=k, n_group=groups,
                           topk_group=keep, norm_topk_prob=True, routed_scaling_factor=2.5)
    # Biases of both signs: excluded groups must lose even against negative
    # biased scores (transformers 5 masks with -inf, as the official code).
    bias = RNG.standard_normal(n).astype(np.float32) * 0.1
    logits = RNG.standard_normal((tokens, n)).astype(np.float32) * 2
    ti, tw = hf_route(DeepseekV3TopkRouter(cfg), logits, bias)
    ids, w = kv.route(logits, k, 1, groups, keep, 1, True, 2.5, bias)
    compare("deepseek-v3 (sigmoid + bias, top-2 group sums, x2.5)", ids, w, ti, tw)


# ---------------------------------------------------------------- MLA
def check_mla(kv):
    """transformers' DeepseekV3Attention (naive: decompress, then attend) on a
    causal prefill, last token, against kvkit's compress + absorbed decode on
    the latent cache fed by transformers' own projections (the engine's GEMMs):
    RMSNorm, the interleaved RoPE pairing, YaRN's softmax mscale, the W_UK /
    W_UV slicing of kv_b_proj."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding
    heads, nope, v, tokens = 4, 32, 48, 77
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    cfg = DeepseekV3Config(hidden_size=heads * v, num_attention_heads=heads, num_key_value_heads=heads,
                           q_lora_rank=64, kv_lora_rank=512, qk_nope_head_dim=nope, qk_rope_head_dim=64,
                           v_head_dim=v, rope_parameters=rope, max_position_embeddings=163840, rope_interleave=True,
                           attention_bias=False, rms_norm_eps=1e-6)
    cfg._attn_implementation = "eager"
    attn = DeepseekV3Attention(cfg, layer_idx=0).eval()
    with torch.no_grad():
        attn.kv_a_layernorm.weight.copy_(torch.from_numpy(1 + 0.3 * RNG.standard_normal(512).astype(np.float32)))
        attn.o_proj.weight.copy_(torch.eye(heads * v))  # compare the heads' outputs directly
        x = torch.from_numpy(RNG.standard_normal((1, tokens, heads * v)).astype(np.float32))
        cos, sin = DeepseekV3RotaryEmbedding(cfg)(x, torch.arange(tokens)[None])
        mask = torch.triu(torch.full((tokens, tokens), -math.inf), 1)[None, None]
        want = attn(x, position_embeddings=(cos, sin), attention_mask=mask)[0][0, -1].reshape(heads, v).numpy()
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))[0].contiguous().numpy()
        kv_a = attn.kv_a_proj_with_mqa(x)[0].contiguous().numpy()
        norm_w = attn.kv_a_layernorm.weight.detach().contiguous().numpy()
        wkv_b = attn.kv_b_proj.weight.detach().contiguous().numpy()
    out = np.zeros((heads, v), dtype=np.float32)
    kv.call("kvkit_mla_last_token", heads, nope, v, ctypes.c_double(10000.0), ctypes.c_double(40.0),
            ctypes.c_int64(4096), ctypes.c_double(1.0), ctypes.c_double(1.0), ptr(q, ctypes.c_float),
            ptr(kv_a, ctypes.c_float), ptr(norm_w, ctypes.c_float), ctypes.c_float(1e-6), ptr(wkv_b, ctypes.c_float),
            ctypes.c_int64(tokens), ptr(out, ctypes.c_float))
    # float32 on both sides in different orders (transformers also rounds its
    # RoPE angles in float32): 1e-4 of the largest output.
    report("mla absorbed decode (kvkit) vs transformers' DeepseekV3Attention, last of 77 tokens",
           float(np.max(np.abs(out - want)) / np.max(np.abs(want))), 1e-4)


# ---------------------------------------------------------------- llama2.c checkpoints
def permute_reverse(w, heads):
    """transformers' Llama q/k rows (rotate-half order) back to Meta's and
    llama2.c's (interleaved pairs): the inverse of the permutation in
    transformers' convert_llama_weights_to_hf.py."""
    rows, cols = w.shape
    return np.swapaxes(w.reshape(heads, 2, rows // heads // 2, cols), 1, 2).reshape(rows, cols)


def check_llama2c(kv):
    """A random transformers LlamaForCausalLM (GQA, untied classifier),
    written as a llama2.c checkpoint the way llama2.c's export.py does, read
    by the gpt_decode example: its logits for the last of 40 tokens must
    equal transformers'."""
    import tempfile
    from transformers import LlamaConfig, LlamaForCausalLM
    dim, hidden, layers, heads, kv_heads, vocab, seq = 64, 172, 2, 4, 2, 97, 64
    cfg = LlamaConfig(hidden_size=dim, intermediate_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=seq, rms_norm_eps=1e-5,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                      initializer_range=0.15)
    model = LlamaForCausalLM(cfg).eval()
    m = model.model
    with torch.no_grad():
        for norm in [m.norm] + [l.input_layernorm for l in m.layers] + [l.post_attention_layernorm for l in m.layers]:
            norm.weight.copy_(1 + 0.3 * torch.randn(dim))
    t = lambda x: x.detach().float().numpy()
    stack = lambda f: np.stack([t(f(l)) for l in m.layers])
    parts = [t(m.embed_tokens.weight), stack(lambda l: l.input_layernorm.weight),
             np.stack([permute_reverse(t(l.self_attn.q_proj.weight), heads) for l in m.layers]),
             np.stack([permute_reverse(t(l.self_attn.k_proj.weight), kv_heads) for l in m.layers]),
             stack(lambda l: l.self_attn.v_proj.weight), stack(lambda l: l.self_attn.o_proj.weight),
             stack(lambda l: l.post_attention_layernorm.weight), stack(lambda l: l.mlp.gate_proj.weight),
             stack(lambda l: l.mlp.down_proj.weight), stack(lambda l: l.mlp.up_proj.weight), t(m.norm.weight),
             np.zeros(seq * dim // heads, dtype=np.float32),  # llama2.c's freq_cis tables (unused)
             t(model.lm_head.weight)]
    tokens = RNG.integers(0, vocab, 40).astype(np.int32)
    with torch.no_grad():
        want = model(torch.from_numpy(tokens.astype(np.int64))[None]).logits[0, -1].numpy()
    got = np.zeros(vocab, dtype=np.float32)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model.bin")
        with open(path, "wb") as f:
            f.write(np.array([dim, hidden, layers, heads, kv_heads, -vocab, seq], dtype=np.int32).tobytes())
            for a in parts:
                f.write(np.ascontiguousarray(a, dtype=np.float32).tobytes())
        kv.call("kvkit_llama2c_last_logits", path.encode(), ptr(tokens, ctypes.c_int32), ctypes.c_int64(len(tokens)),
                ptr(got, ctypes.c_float))
    report("gpt_decode's llama2.c reading vs transformers' LlamaForCausalLM (GQA 4/2, 40 tokens): last logits",
           float(np.max(np.abs(got - want)) / np.max(np.abs(want))), 1e-4)


# ---------------------------------------------------------------- attention
def check_decode(kv):
    batch, q_heads, kv_heads, d, page = 5, 16, 4, 128, 16
    lens = np.array([1, 17, 300, 1000, 64], dtype=np.int32)
    max_blocks = int((lens.max() + page - 1) // page)
    pages = batch * max_blocks + 3
    perm = RNG.permutation(pages).astype(np.int32)
    table = perm[:batch * max_blocks].reshape(batch, max_blocks).copy()
    k_pages = RNG.standard_normal((pages, page, kv_heads, d)).astype(np.float32)
    v_pages = RNG.standard_normal((pages, page, kv_heads, d)).astype(np.float32)
    q = RNG.standard_normal((batch, q_heads, d)).astype(np.float32)
    scale = 1.0 / math.sqrt(d)
    for name, window, sinks, softcap in (("plain", 0, 0, 0.0), ("window 100 + 4 sinks", 100, 4, 0.0),
                                         ("soft-cap 30", 0, 0, 30.0)):
        o, lse = kv.decode(q, k_pages, v_pages, table, lens, scale, window, sinks, softcap)
        worst_o = worst_lse = 0.0
        for b in range(batch):
            n = int(lens[b])
            rows = table[b][(np.arange(n) // page)] * page + np.arange(n) % page
            kk = torch.from_numpy(k_pages.reshape(-1, kv_heads, d)[rows]).double().permute(1, 0, 2)
            vv = torch.from_numpy(v_pages.reshape(-1, kv_heads, d)[rows]).double().permute(1, 0, 2)
            # transformers' repeat_kv: query head h reads kv head h // (q_heads / kv_heads).
            kk = kk.repeat_interleave(q_heads // kv_heads, dim=0)
            vv = vv.repeat_interleave(q_heads // kv_heads, dim=0)
            qq = torch.from_numpy(q[b]).double()[:, None, :]
            s = (qq @ kk.transpose(1, 2))[:, 0, :] * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            pos = torch.arange(n)
            visible = torch.ones(n, dtype=torch.bool)
            if window > 0:
                visible = (pos > n - 1 - window) | (pos < sinks)
            s = s.masked_fill(~visible, -math.inf)
            want_lse = torch.logsumexp(s, dim=-1)
            want_o = (torch.softmax(s, dim=-1)[:, None, :] @ vv)[:, 0, :]
            worst_o = max(worst_o, float((torch.from_numpy(o[b]).double() - want_o).abs().max()))
            worst_lse = max(worst_lse, float((torch.from_numpy(lse[b]).double() - want_lse).abs().max()))
        report(f"decode GQA 16/4 {name}: o vs float64 torch", worst_o, 1e-5)
        report(f"decode GQA 16/4 {name}: lse", worst_lse, 1e-5)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    kv = Kvkit(sys.argv[1])
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, numpy {np.__version__}")
    for check in (check_rope_tables, check_rope_apply, check_moe, check_decode, check_mla, check_llama2c):
        try:
            check(kv)
        except Exception as e:
            print(f"FAIL {check.__name__}: {type(e).__name__}: {e}")
            FAILURES.append(check.__name__)
    if FAILURES:
        print(f"{len(FAILURES)} failed: {', '.join(FAILURES)}")
        return 1
    print("all agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
