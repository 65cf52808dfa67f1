"""The 'text_perplexity' and 'greedy_continuations' evaluators (kuaijax/evals/text_file.py) on tiny
random models against values computed independently from the model's logits, and the JSONL text
helpers of kuaijax/data/text_files.py."""

import json

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kuaijax import parallel
from kuaijax.data import text_files
from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.evals import registry
from kuaijax.jit_cache import split_params
from kuaijax.models.transformer import Transformer, TransformerConfig

TOK = ByteTokenizer()
TEXTS = ['The quick brown fox.', 'Grüße 🚀 12+30=42', 'def f(a):\n  return a']


def tiny_model(**overrides):
  cfg = dict(
    vocab_size=TOK.vocab_size,
    d_model=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    d_ff=32,
    init_std=0.5,  # far from uniform logits, so that a wrong position or mask shows
  )
  return Transformer(TransformerConfig(**{**cfg, **overrides}), rngs=nnx.Rngs(4))


def moe_model(routing):
  return tiny_model(
    mlp='moe', mlp_options=dict(num_experts=4, expert_d_ff=8, renormalize=True, **routing)
  )


@pytest.fixture
def eval_file(tmp_path):
  path = tmp_path / 'texts.jsonl'
  path.write_text('\n'.join(json.dumps({'text': t}) for t in TEXTS) + '\n\n')
  return str(path)


def context(devices=2):
  section = ml_collections.ConfigDict(
    dict(num_devices=devices, mesh=dict(data=-1, fsdp=1, tensor=1, expert=1))
  )
  return registry.EvalContext(
    tokenizer=TOK, mesh=parallel.mesh_from_config(section), rules=parallel.DEFAULT_RULES
  )


def build(evals: dict, ctx=None):
  return registry.build_evaluators(ml_collections.ConfigDict(evals), ctx or context())


def reference_nll(model, token_lists):
  """Per text, -log softmax(logits)[t, token t+1] in float64, each text run alone (no padding)."""
  out = []
  for tokens in token_lists:
    logits = np.asarray(model(jnp.asarray(tokens)[None])[0][0], np.float64)
    logits -= logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out.append(-logp[np.arange(len(tokens) - 1), tokens[1:]])
  return out


def test_read_texts_and_batches(tmp_path, eval_file):
  assert text_files.read_texts(eval_file) == TEXTS
  assert text_files.read_texts(eval_file, max_texts=2) == TEXTS[:2]
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: needs a JSON object with a string "text"'):
    text_files.read_texts(str(bad))
  bad.write_text('{"text": "a"}\nnot json\n')
  with pytest.raises(ValueError, match=r'bad.jsonl:2: not valid JSON'):
    text_files.read_texts(str(bad))
  with pytest.raises(FileNotFoundError, match='missing.jsonl'):
    text_files.read_texts(str(tmp_path / 'missing.jsonl'))
  with pytest.raises(ValueError, match='eval_file is required'):
    text_files.read_texts('')

  tokens, truncated = text_files.encode_texts(TOK, ['abcdef', 'ab', 'abcd'], max_len=4)
  assert truncated == 1 and [len(t) for t in tokens] == [4, 2, 4]
  first, second = text_files.text_batches(tokens, batch_size=2)
  np.testing.assert_array_equal(first['segment_ids'], [[1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(first['loss_mask'], [[1, 1, 1, 0], [1, 0, 0, 0]])
  np.testing.assert_array_equal(first['targets'][0, :3], tokens[0][1:])
  np.testing.assert_array_equal(second['segment_ids'][1], 0)  # the filler row: no loss
  assert second['loss_mask'].sum() == 3


@pytest.mark.parametrize('devices', [1, 2])
def test_perplexity_equals_log_softmax_of_the_logits(eval_file, devices):
  model = tiny_model()
  block = dict(type='text_perplexity', eval_file=eval_file, max_len=18, batch_size=2)
  evaluator = build({'text': block}, context(devices)).evaluators['text']
  metrics = evaluator.evaluate(*split_params(model))

  token_lists = [TOK.encode_array(t)[:18] for t in TEXTS]
  nll = reference_nll(model, token_lists)
  count = sum(len(n) for n in nll)
  assert metrics['tokens'] == count and metrics['texts'] == 3
  assert metrics['truncated_texts'] == sum(len(TOK.encode_array(t)) > 18 for t in TEXTS) > 0
  np.testing.assert_allclose(metrics['mean_nll'], sum(n.sum() for n in nll) / count, rtol=1e-5)
  np.testing.assert_allclose(metrics['perplexity'], np.exp(metrics['mean_nll']), rtol=1e-12)
  width = max(len(n) for n in nll)
  by_position = [np.mean([n[t] for n in nll if len(n) > t]) for t in range(width)]
  np.testing.assert_allclose(metrics['nll_by_position'], by_position, rtol=1e-5)
  assert 'experts_per_token' not in metrics  # a dense model: no MoE pass


def test_experts_per_token_of_moe_models(eval_file):
  block = dict(type='text_perplexity', eval_file=eval_file, batch_size=4)
  evaluators = build({'text': block}).evaluators
  top2 = evaluators['text'].evaluate(*split_params(moe_model(dict(routing='top_k', k=2))))
  assert top2['experts_per_token'] == 2.0
  assert top2['moe/layer0/mean_k'] == top2['moe/layer1/mean_k'] == 2.0
  all_experts = moe_model(dict(routing='top_p', p=1.0, k_max=4))
  assert evaluators['text'].evaluate(*split_params(all_experts))['experts_per_token'] == 4.0
  off = build({'text': {**block, 'moe_stats': False}}).evaluators['text']
  assert 'experts_per_token' not in off.evaluate(*split_params(all_experts))


def test_greedy_continuations_equal_argmax_decoding(eval_file):
  model = tiny_model()
  block = dict(
    type='greedy_continuations',
    eval_file=eval_file,
    num_generations=2,
    prompt_tokens=6,
    max_new_tokens=5,
  )
  metrics = build({'gen': block}).evaluate(*split_params(model))
  expected = []
  for text in TEXTS[:2]:
    full = TOK.encode_array(text)
    tokens = list(full[: min(len(full) // 2, 6)])  # half of the text, at most prompt_tokens
    prompt, completion = list(tokens), []
    for _ in range(5):
      logits = model(jnp.asarray(tokens)[None])[0][0, -1]
      completion.append(int(jnp.argmax(logits)))
      tokens.append(completion[-1])
      if completion[-1] == TOK.eos_id:
        break
    expected.append(dict(prompt=TOK.decode(prompt), completion=TOK.decode(completion)))
  assert metrics['generations'] == expected


def test_options_are_checked(eval_file):
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_length'\]"):
    build({'text': dict(type='text_perplexity', eval_file=eval_file, max_length=8)})
  with pytest.raises(ValueError, match='eval_file is required'):
    build({'text': dict(type='text_perplexity')})
  with pytest.raises(ValueError, match='fewer than 2 tokens'):
    build({'text': dict(type='text_perplexity', eval_file=eval_file, max_len=1)})
  none = dict(type='greedy_continuations', eval_file=eval_file, num_generations=0)
  assert build({'gen': none}).evaluators == {}
