"""SmolLM2 quantized and run with params sharded over 8 simulated CPU devices matches the unsharded run.

Runs in a subprocess: the device count must be set before jax is imported.

What "matches" means: the sharded forward pass sums in another order, so the
calibration activations differ from the unsharded ones at the 1e-7 level. Where
the inputs are identical (block 0's q/k/v see the embedding) GPTQ's codes are
identical bit for bit; later, GPTQ's error feedback amplifies near-tie flips, so
the codes differ while the quality (per-layer output error, perplexity) does not.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lqx import data, evaluate, io, recipe
    from lqx.models import llama
    from lqx.quant.gptq import GPTQConfig

    assert jax.device_count() == 8, jax.devices()
    config, params = io.load_model("smollm2-135m")
    params = jax.tree.map(jnp.asarray, params)
    tok = io.load_tokenizer("smollm2-135m")
    calib = data.sample_windows(data.tokenize(tok, data.load_text("train")), 4, 128, seed=0)
    heldout = data.tokenize(tok, data.load_text("heldout"))[:8 * 128]
    rules = [recipe.Rule(r"layers_[01]/(attn|mlp)/\w+_proj/kernel", GPTQConfig(bits=3, group_size=64, act_order=True))]

    mesh = Mesh(np.array(jax.devices()), ("model",))
    def shard(tree):
      # Kernels (in, out) and QArray leaves over output channels, the embedding over the vocabulary.
      def put(path, x):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        if x.ndim == 2 and names[0] == "embed":
          return jax.device_put(x, NamedSharding(mesh, P("model", None)))
        if x.ndim == 2 and x.shape[1] % 8 == 0:
          return jax.device_put(x, NamedSharding(mesh, P(None, "model")))
        return jax.device_put(x, NamedSharding(mesh, P()))
      return jax.tree_util.tree_map_with_path(put, tree)

    sharded = shard(params)
    assert len(sharded["layers_0"]["attn"]["q_proj"]["kernel"].sharding.device_set) == 8
    q_ref, rep_ref = recipe.quantize(config, params, rules, calib, progress=False)
    q_sh, rep_sh = recipe.quantize(config, sharded, rules, calib, progress=False)

    # 1. Identical inputs -> identical GPTQ codes and scales.
    for proj in ("q_proj", "k_proj", "v_proj"):
      a, b = q_ref["layers_0"]["attn"][proj]["kernel"], q_sh["layers_0"]["attn"][proj]["kernel"]
      np.testing.assert_array_equal(np.asarray(a.packed), np.asarray(b.packed))
      np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    # 2. Same quality layer by layer.
    for a, b in zip(rep_ref.layers, rep_sh.layers):
      assert a.name == b.name and abs(a.error - b.error) <= 0.1 * a.error + 1e-6, (a.name, a.error, b.error)
    # 3. Running the same quantized params sharded gives the same logits.
    toks = jnp.asarray(calib[:2])
    la = np.asarray(llama.apply(config, q_ref, toks))
    lb = np.asarray(llama.apply(config, shard(q_ref), toks))
    assert np.abs(la - lb).max() < 1e-3, np.abs(la - lb).max()
    # 4. Same held-out perplexity for the two quantizations.
    pa = evaluate.perplexity(config, q_ref, heldout, seq_len=128, progress=False).ppl
    pb = evaluate.perplexity(config, q_sh, heldout, seq_len=128, progress=False).ppl
    assert abs(np.log(pa / pb)) < 0.1, (pa, pb)  # GPTQ on 512 tokens: flips move ppl by a few %
    print("OK", pa, pb)
""")


def test_quantize_and_apply_sharded_over_8_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
