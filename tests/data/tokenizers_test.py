import pytest

from kuaijax.data import arith, tokenizers

TEXTS = [
  'hello world',
  '  leading and trailing spaces  ',
  'def f(x):\n\treturn x  # tab\n\n',
  'héllo wörld, 世界 🙂 Ωμέγα',
  '',
]


def _corpus() -> list[str]:
  problems = [arith.generate_problem(0, i, 1 + i % 4) for i in range(400)]
  texts = [arith.format_prompt(p.question) + p.solution for p in problems]
  return texts + ['def add(a, b):\n    return a + b\n'] * 20


@pytest.fixture(scope='module')
def spm_path(tmp_path_factory):
  prefix = tmp_path_factory.mktemp('spm') / 'tiny'
  return tokenizers.train_sentencepiece(_corpus(), vocab_size=400, model_prefix=prefix)


def test_byte_tokenizer_ids_and_round_trip():
  tok = tokenizers.ByteTokenizer()
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259)
  assert tok.encode('Ab') == [ord('A') + 3, ord('b') + 3]
  for text in TEXTS:
    ids = tok.encode(text)
    assert min(ids, default=3) >= 3 and max(ids, default=3) < 259
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids


def test_byte_tokenizer_decode_skips_specials_and_replaces_bad_utf8():
  tok = tokenizers.ByteTokenizer()
  ids = [tok.bos_id] + tok.encode('hi') + [tok.eos_id, tok.pad_id, 300]
  assert tok.decode(ids) == 'hi'
  assert tok.decode([0xFF + 3]) == '\ufffd'


def test_sentencepiece_round_trip_and_specials(spm_path):
  tok = tokenizers.get_tokenizer('sentencepiece', spm_model_path=spm_path)
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 400)
  for text in TEXTS + ['unseen: Ж ß 🤖 \x00 ~']:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_array(text).tolist() == ids
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, 10_000]) == text
  # Training on arithmetic gives real merges, not only bytes.
  assert len(tok.encode('The answer is 17')) < len('The answer is 17')


def test_train_sentencepiece_is_deterministic(spm_path, tmp_path):
  again = tokenizers.train_sentencepiece(_corpus(), vocab_size=400, model_prefix=tmp_path / 'again')
  first, second = (
    tokenizers.SentencePieceTokenizer(spm_path),
    tokenizers.SentencePieceTokenizer(again),
  )
  assert [first.encode(t) for t in TEXTS] == [second.encode(t) for t in TEXTS]
  assert [first._sp.id_to_piece(i) for i in range(400)] == [
    second._sp.id_to_piece(i) for i in range(400)
  ]


def test_get_tokenizer_errors(tmp_path):
  assert isinstance(tokenizers.get_tokenizer('byte'), tokenizers.ByteTokenizer)
  with pytest.raises(ValueError, match="'bpe'.*byte, sentencepiece"):
    tokenizers.get_tokenizer('bpe')
  missing = tmp_path / 'nope.model'
  with pytest.raises(FileNotFoundError, match='nope.model'):
    tokenizers.get_tokenizer('sentencepiece', spm_model_path=missing)
  with pytest.raises(ValueError, match='spm_model_path'):
    tokenizers.get_tokenizer('sentencepiece')
