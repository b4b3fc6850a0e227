"""One Flax NNX decoder for Qwen3 (q/k norm), Qwen2 (q/k/v bias) and Llama, with LoRA and packed sequences.

Layers are stacked (every layer Variable has a leading axis L) and applied with `jax.lax.scan`, so deep models
compile once per layer shape. models/names.py (the HF name map) and sharding.py follow this layout.
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ctxd_jax.models.attention import attention
from ctxd_jax.models.config import ModelConfig
from ctxd_jax.models.rope import Rope

# Layer remat (the scan always keeps each layer's input). nothing_saveable: recompute the whole layer in the
# backward, least memory. dots_with_no_batch_dims_saveable: keep the projection outputs (x @ W has no dot_general
# batch dims), recompute attention (batched over B, heads) and elementwise ops. save_mlp: keep only the MLP's
# gate and up products (the largest matmuls, half the layer's FLOPs), recompute the rest. save_attention: remat
# the parts before and after the attention kernel, not the kernel: its inputs, output and softmax statistics stay,
# so the backward never re-runs attention (the costliest op at long sequence lengths).
REMAT_POLICIES = {
    "save_attention": jax.checkpoint_policies.nothing_saveable,  # applied to the two parts, see Transformer
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_mlp": jax.checkpoint_policies.save_only_these_names("mlp_gate", "mlp_up"),
}


def rope_sin_cos(positions, rope: Rope):
    """HF rotate_half convention: angles for dims i and i + hd/2 are equal. Returns float32 [B, T, hd] each."""
    if rope.max_row is not None and positions.shape[-1] > rope.max_row:
        raise ValueError(f"rope_type {rope.rope_type!r}: rows of {positions.shape[-1]} tokens are longer than "
                         f"max_position_embeddings {rope.max_row}, past which transformers changes the frequencies "
                         f"per batch")
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope.inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    sin, cos = jnp.sin(emb), jnp.cos(emb)
    if rope.attention_scaling != 1.0:
        sin, cos = sin * rope.attention_scaling, cos * rope.attention_scaling
    return sin, cos


def apply_rope(x, sin, cos):
    """x [B, T, H, hd]; sin/cos [B, T, hd]."""
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm in float32 (as HF), output cast back to the compute dtype."""

    def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class LoRALinear(nnx.Module):
    """y = x @ kernel + bias + (x @ lora_a @ lora_b) * alpha / rank (PEFT's scale). Kernel is [in, out]."""

    def __init__(self, d_in: int, d_out: int, *, use_bias: bool = False, lora_rank: int = 0, lora_alpha: float = 0.0,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = nnx.Param(jax.random.normal(rngs.params(), (d_in, d_out), param_dtype) * 0.02)
        self.bias = nnx.Param(jnp.zeros((d_out,), param_dtype)) if use_bias else None
        self.lora_rank = lora_rank
        if lora_rank > 0:
            self.lora_scale = lora_alpha / lora_rank
            # PEFT: kaiming_uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(in), 1/sqrt(in)); B zeros, so the adapter starts
            # as the identity.
            bound = 1.0 / math.sqrt(d_in)
            self.lora_a = nnx.LoRAParam(
                jax.random.uniform(rngs.params(), (d_in, lora_rank), jnp.float32, -bound, bound))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, d_out), jnp.float32))

    def __call__(self, x):
        # Products come out in the compute dtype: the matrix units accumulate in float32 internally either way, and
        # a float32 [tokens, out] result per projection, cast afterwards, doubles the memory traffic on GPU.
        dt = self.dtype
        x = x.astype(dt)
        y = jnp.dot(x, self.kernel[...].astype(dt))
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        if self.lora_rank > 0:
            h = jnp.dot(x, self.lora_a[...].astype(dt))
            y = y + jnp.dot(h, (self.lora_b[...] * self.lora_scale).astype(dt))
        return y


def _linear(cfg: ModelConfig, **kw):
    """A projection by its HF name, with a bias where the config gives it one."""
    return lambda name, d_in, d_out: LoRALinear(d_in, d_out, use_bias=name in cfg.biases, **kw)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, lora_rank, lora_alpha, dtype, param_dtype, attn_impl, rngs):
        d, hd = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.attn_impl = attn_impl
        lin = _linear(cfg, lora_rank=lora_rank, lora_alpha=lora_alpha, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
        self.q_proj = lin("q_proj", d, cfg.num_heads * hd)
        self.k_proj = lin("k_proj", d, cfg.num_kv_heads * hd)
        self.v_proj = lin("v_proj", d, cfg.num_kv_heads * hd)
        self.o_proj = lin("o_proj", cfg.num_heads * hd, d)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        else:
            self.q_norm = self.k_norm = None

    def qkv(self, x, sin, cos):
        """Projected, normed (Qwen3) and rotated q [B,T,Hq,hd], k, v [B,T,Hkv,hd]."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, sin, cos), apply_rope(k, sin, cos), v

    def kernel(self, q, k, v, segment_ids, max_segments=None):
        # attn_impl None/'xla': dense causal & same-segment mask; 'cudnn': flash attention (plain causal for one-sample
        # rows, the packed layout from segment ids otherwise, with room for max_segments per row).
        return attention(q, k, v, segment_ids, impl=self.attn_impl, max_segments=max_segments)

    def output(self, out):
        b, t = out.shape[:2]
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, lora_rank, lora_alpha, dtype, param_dtype, rngs):
        lin = _linear(cfg, lora_rank=lora_rank, lora_alpha=lora_alpha, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
        self.gate_proj = lin("gate_proj", cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = lin("up_proj", cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = lin("down_proj", cfg.intermediate_size, cfg.hidden_size)

    def __call__(self, x):
        gate = checkpoint_name(self.gate_proj(x), "mlp_gate")
        up = checkpoint_name(self.up_proj(x), "mlp_up")
        return self.down_proj(jax.nn.silu(gate) * up)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, lora_rank, lora_alpha, dtype, param_dtype, attn_impl, rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Attention(cfg, lora_rank=lora_rank, lora_alpha=lora_alpha, dtype=dtype,
                                   param_dtype=param_dtype, attn_impl=attn_impl, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg, lora_rank=lora_rank, lora_alpha=lora_alpha, dtype=dtype, param_dtype=param_dtype,
                       rngs=rngs)

    def attention_inputs(self, x, sin, cos):
        return self.self_attn.qkv(self.input_layernorm(x), sin, cos)

    def after_attention(self, x, attn_out):
        x = x + self.self_attn.output(attn_out)
        return x + self.mlp(self.post_attention_layernorm(x))

    def __call__(self, x, sin, cos, segment_ids, max_segments=None):
        q, k, v = self.attention_inputs(x, sin, cos)
        return self.after_attention(x, self.self_attn.kernel(q, k, v, segment_ids, max_segments))


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, param_dtype, rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (vocab, dim), param_dtype) * 0.02)

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)


class Transformer(nnx.Module):
    """model(tokens[B,T], positions[B,T], segment_ids[B,T]) -> final-normed hidden [B,T,D] (segment 0 = padding).

    lm_head_kernel() gives the [D, V] output projection (the embedding's transpose when tied); logits are left to
    ctxd_jax.models.logprobs, which computes them in chunks.
    """

    def __init__(self, cfg: ModelConfig, *, lora_rank: int = 0, lora_alpha: float = 0.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat: bool = False, remat_policy: str = "nothing_saveable",
                 attn_impl: str | None = None, rngs: nnx.Rngs):
        if remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {remat_policy!r}: expected one of {sorted(REMAT_POLICIES)}")
        self.cfg, self.dtype, self.remat, self.remat_policy = cfg, dtype, remat, remat_policy
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        block_kw = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, dtype=dtype, param_dtype=param_dtype,
                        attn_impl=attn_impl)

        # Stacked layers: init one Block per key under jax.vmap (a pure function of the key), then merge the
        # stacked state into one Block whose Variables carry a leading L axis. Plain jax transforms, so this works
        # the same across flax versions and under nnx.eval_shape.
        def init_state(key):
            return nnx.split(Block(cfg, **block_kw, rngs=nnx.Rngs(params=key)))

        graphdef = nnx.eval_shape(lambda: init_state(jax.random.key(0)))[0]
        keys = jax.random.split(rngs.params(), cfg.num_layers)
        stacked = jax.vmap(lambda k: init_state(k)[1])(keys)
        self.layers = nnx.merge(graphdef, stacked)

        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if cfg.tie_word_embeddings else LoRALinear(
            cfg.hidden_size, cfg.vocab_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def lm_head_kernel(self):
        """[D, V] in the parameter dtype."""
        if self.lm_head is None:
            return self.embed_tokens.embedding[...].T
        return self.lm_head.kernel[...]

    def __call__(self, tokens, positions, segment_ids, *, max_segments: int | None = None,
                 return_layer_outputs: bool = False):
        """max_segments: static bound on segments per row, needed by the cuDNN kernel (attention.segment_bound of
        the host batch). With return_layer_outputs, also returns [L, B, T, D]: each layer's output before the final norm
        (HF's hidden_states[1:L], plus the last layer's un-normed output), for per-layer parity debugging."""
        x = self.embed_tokens(tokens)
        sin, cos = rope_sin_cos(positions, self.cfg.rope)
        graphdef, state = nnx.split(self.layers)

        def layer(x, layer_state):
            y = nnx.merge(graphdef, layer_state)(x, sin, cos, segment_ids, max_segments)
            return y, (y if return_layer_outputs else None)

        def layer_around_attention(x, layer_state):
            remat = functools.partial(jax.checkpoint, prevent_cse=False)
            before = remat(lambda s, x: nnx.merge(graphdef, s).attention_inputs(x, sin, cos))
            after = remat(lambda s, x, a: nnx.merge(graphdef, s).after_attention(x, a))
            q, k, v = before(layer_state, x)
            attn = nnx.merge(graphdef, layer_state).self_attn.kernel(q, k, v, segment_ids, max_segments)
            y = after(layer_state, x, attn)
            return y, (y if return_layer_outputs else None)

        if self.remat and self.remat_policy == "save_attention":
            body = layer_around_attention
        elif self.remat:
            body = jax.checkpoint(layer, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        else:
            body = layer
        x, outs = jax.lax.scan(body, x, state)
        h = self.norm(x)
        return (h, outs) if return_layer_outputs else h
