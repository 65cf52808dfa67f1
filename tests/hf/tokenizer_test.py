"""HF tokenizer and chat template vs transformers' AutoTokenizer on a locally trained BPE."""

import numpy as np
import pytest

pytest.importorskip('tokenizers')
pytest.importorskip('jinja2')

from kuaijax.data.tokenizers import get_tokenizer  # noqa: E402
from kuaijax.hf.tokenizer import HFTokenizer, train_bpe  # noqa: E402

CORPUS = [
  'The quick brown fox jumps over the lazy dog. ' * 3,
  'def add(a, b):\n    return a + b\n',
  'Grüße aus Köln, 你好世界, ça va? 🚀🚀',
  '12 + 30 = 42; 7 * 6 = 42.',
]
STRINGS = [
  'the lazy fox',
  'héllo wörld 你好 🚀',
  '<s>special</s> inside <|im_start|>text<|im_end|>',
  '  leading\n\ttabs  and trailing  ',
  '',
  'unseen characters: ∮ ≈ ℵ',
]
CHATS = [
  [{'role': 'user', 'content': 'What is 12 + 30?'}],
  [
    {'role': 'system', 'content': '  You are terse.  '},
    {'role': 'user', 'content': 'Grüße 🚀'},
    {'role': 'assistant', 'content': '42\n'},
    {'role': 'user', 'content': 'and <s>?'},
  ],
]
# Exercises loop controls, namespaces, tojson with non-ASCII, raise_exception and the specials.
TEMPLATE = (
  '{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}'
  "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
  "{% if m['role'] == 'system' %}{{ m['content'] | tojson }}\n{% continue %}{% endif %}"
  "{% set ns.n = ns.n + 1 %}\n  <|im_start|>{{ m['role'] }} {{ ns.n }}\n{{ m['content'] }}<|im_end|>\n"
  '{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}'
)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  out = {}
  for name, template in (('chatml', None), ('custom', TEMPLATE)):
    folder = str(tmp_path_factory.mktemp(name))
    kwargs = {} if template is None else {'chat_template': template}
    train_bpe(CORPUS, folder, vocab_size=300, **kwargs)
    out[name] = folder
  return out


def _auto(folder):
  transformers = pytest.importorskip('transformers')
  return transformers.AutoTokenizer.from_pretrained(folder)


def test_specials_and_round_trip(folders):
  tok = HFTokenizer(folders['chatml'])
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for text in STRINGS:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id
    if '<' not in text:
      assert tok.decode(ids) == text
  assert tok.encode_array('the fox').dtype == np.int32


@pytest.mark.parametrize('name', ['chatml', 'custom'])
def test_matches_auto_tokenizer(folders, name):
  ours, theirs = get_tokenizer('hf', hf_path=folders[name]), _auto(folders[name])
  for text in STRINGS:
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.encode(text, add_special_tokens=False) == theirs.encode(
      text, add_special_tokens=False
    )
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == theirs.decode(ids)
  for chat in CHATS:
    for gen in (False, True):
      text = ours.apply_chat_template(chat, add_generation_prompt=gen)
      assert text == theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
      ref = theirs.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
      ref = ref['input_ids'] if hasattr(ref, 'keys') else ref
      assert ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True) == list(ref)


def test_bad_files_are_named(folders, tmp_path):
  (tmp_path / 'tokenizer.json').write_text('{"version": "1.0", "model": 3')
  with pytest.raises(ValueError, match='tokenizer.json: not a valid tokenizers file'):
    HFTokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='no tokenizer.json'):
    HFTokenizer(str(tmp_path / 'missing'))
  with pytest.raises(Exception, match='bad role'):
    HFTokenizer(folders['custom']).apply_chat_template([{'role': 'tool', 'content': 'x'}])


def test_pipelines_read_the_tokenizer_of_the_policy_hf_folder(folders, tmp_path):
  """data.tokenizer='hf' takes tokenizer.json from the policy role's HF folder (no other path)."""
  import shutil

  import ml_collections

  from kuaijax.config_lib import load_config
  from kuaijax.hf import model_io
  from kuaijax.models.transformer import TransformerConfig
  from kuaijax.stages import runner
  from tests.conftest import REPO_ROOT
  from tests.hf.model_io_errors_test import random_model

  model = random_model(
    TransformerConfig(
      vocab_size=512, d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=32
    )
  )
  folder = str(tmp_path / 'model')
  shutil.copytree(folders['chatml'], folder)
  model_io.save_model(model, folder, family='llama')
  config = load_config(f'{REPO_ROOT}/configs/arith/posttrain.py:runlocal')
  config.data.tokenizer = 'hf'
  with config.unlocked():
    config.models.policy = ml_collections.ConfigDict(dict(hf=folder))
  tokenizer = runner.Pipeline(config, str(tmp_path)).tokenizer
  text = 'Question: 12 + 30 = ?'
  assert isinstance(tokenizer, HFTokenizer)
  np.testing.assert_array_equal(
    tokenizer.encode_array(text), HFTokenizer(folders['chatml']).encode_array(text)
  )
  with config.unlocked():
    config.models.policy = load_config(f'{REPO_ROOT}/configs/arith/posttrain.py').models.policy
  with pytest.raises(ValueError, match='hf_path'):
    _ = runner.Pipeline(config, str(tmp_path)).tokenizer
