"""Shared fixtures: the real SmolLM2-135M model and the Shakespeare splits, loaded once."""

import functools
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True, scope="module")
def _fresh_jit_caches():
  """Drop compiled executables after each test module. One process compiles thousands of XLA
  programs over the suite; each holds memory mappings, and a full run once aborted inside an XLA
  compile near the end (the per-process map limit is 65,530 here)."""
  yield
  jax.clear_caches()


@functools.cache
def _smollm2():
  from lqx import assets
  from lqx.io import gguf

  path = assets.smollm2_gguf()
  config, params = gguf.load_gguf(path)
  return config, jax.tree.map(jnp.asarray, params), gguf.load_tokenizer(path)


@pytest.fixture(scope="session")
def smollm2():
  """(config, params, tokenizer) of SmolLM2-135M-Instruct from the packaged GGUF."""
  return _smollm2()


@pytest.fixture(scope="session")
def heldout_tokens(smollm2):
  from lqx import data

  return data.tokenize(smollm2[2], data.load_text("heldout"))


@pytest.fixture(scope="session")
def train_tokens(smollm2):
  from lqx import data

  return data.tokenize(smollm2[2], data.load_text("train"))


EXPERIMENTS = pathlib.Path(__file__).parent.parent / "experiments"


def run_script(name: str, argv: list[str]) -> dict:
  """``experiments/<name>.py``'s ``main(argv)``, imported from its file (the scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.main(argv)
