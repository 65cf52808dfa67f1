"""PEFT LoRA adapters against the `peft` library: an adapter made by peft gives kuaijax the logits
peft gives, and an adapter made in kuaijax loads in peft with the same logits (Llama, Qwen2 and
Qwen2-MoE); wrong adapters are refused with the reason."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from kuaijax import main  # noqa: E402
from kuaijax.config_lib import load_config  # noqa: E402
from kuaijax.hf import model_io, peft_io, reference  # noqa: E402
from kuaijax.hf.tokenizer import train_bpe  # noqa: E402
from kuaijax.models import lora  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.hf.hf_eval_test import TEXTS  # noqa: E402

TOKENS = np.random.RandomState(0).randint(3, 128, (2, 24))
# The module kinds of each family: attention, dense SwiGLUs, the untied head.
MODULES = {
  'llama': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj', 'lm_head'],
  'qwen2': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
  # No SwiGLU names: with them peft (transformers 5) also adapts the routed experts' fused tensors.
  'qwen2_moe': ['q_proj', 'v_proj', 'o_proj', 'lm_head'],
}


def peft_model(base, folder=None, **lora_options):
  """The peft model of `base` with random B factors (a trained adapter), or loaded from folder."""
  if folder is not None:
    return peft.PeftModel.from_pretrained(base, folder).eval()
  model = peft.get_peft_model(base, peft.LoraConfig(**lora_options))
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'lora_' in name:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
  return model.eval()


def torch_logits(model):
  with torch.no_grad():
    return model(torch.as_tensor(TOKENS)).logits.float().numpy()


def kuaijax_logits(model):
  return np.asarray(model(jnp.asarray(TOKENS))[0])


@pytest.mark.parametrize('family', list(MODULES))
def test_peft_adapter_gives_peft_logits_in_kuaijax(tmp_path, family):
  base = reference.make_model(family, str(tmp_path / 'base'))
  options = dict(r=4, lora_alpha=8, target_modules=MODULES[family], use_rslora=family == 'qwen2')
  hf = peft_model(base, **options)
  hf.save_pretrained(str(tmp_path / 'adapter'))
  expected = torch_logits(hf)
  model = model_io.load_model(str(tmp_path / 'base'))
  plain = kuaijax_logits(model)
  peft_io.load_adapter(model, str(tmp_path / 'adapter'))
  assert np.abs(expected - plain).max() > 0.1  # the adapter matters
  np.testing.assert_allclose(kuaijax_logits(model), expected, atol=1e-4)


@pytest.mark.parametrize('family', list(MODULES))
def test_kuaijax_adapter_loads_in_peft_with_the_same_logits(tmp_path, family):
  base = reference.make_model(family, str(tmp_path / 'base'))
  model = model_io.load_model(str(tmp_path / 'base'))
  targets = ('w[qkvo]', 'w[123]', 'head') if family == 'llama' else ('wq', 'wv', 'w2')
  cfg = lora.LoRAConfig(rank=3, alpha=6.0, targets=targets, rslora=True)
  if family == 'qwen2_moe':  # not the routed experts: PEFT has no per-module layout for them
    cfg = lora.LoRAConfig(rank=3, alpha=6.0, targets=(r'.*attn\.w[qkvo]', r'.*shared\.w[123]'))
  lora.apply(model, cfg, rngs=nnx.Rngs(0))
  for i, adapter in enumerate(lora.adapters(model).values()):
    adapter.b[...] = 0.2 * jax.random.normal(jax.random.key(i), adapter.b.shape)
  assert peft_io.save_adapter(model, cfg, str(tmp_path / 'adapter')) == family
  hf = peft_model(base, str(tmp_path / 'adapter'))
  np.testing.assert_allclose(torch_logits(hf), kuaijax_logits(model), atol=1e-4)


def test_wrong_adapters_are_refused(tmp_path):
  base = reference.make_model('llama', str(tmp_path / 'base'))
  peft_model(base, r=4, lora_alpha=8, target_modules=['q_proj']).save_pretrained(
    str(tmp_path / 'adapter')
  )
  other = model_io.load_model(str(tmp_path / 'base'))
  qwen = reference.make_model('qwen2', str(tmp_path / 'qwen'))
  del qwen
  with pytest.raises(ValueError, match='made for LlamaForCausalLM, the model is Qwen2ForCausalLM'):
    peft_io.load_adapter(model_io.load_model(str(tmp_path / 'qwen')), str(tmp_path / 'adapter'))
  bigger = reference.make_model('llama', str(tmp_path / 'big'), hidden_size=64)
  del bigger
  with pytest.raises(ValueError, match=r'shapes \(4, 32\) .* needs \(4, 64\)'):
    peft_io.load_adapter(model_io.load_model(str(tmp_path / 'big')), str(tmp_path / 'adapter'))
  config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  (tmp_path / 'adapter' / 'adapter_config.json').write_text(
    json.dumps({**config, 'use_dora': True})
  )
  with pytest.raises(ValueError, match='use_dora=True is not supported'):
    peft_io.load_adapter(other, str(tmp_path / 'adapter'))


def test_hf_eval_config_scores_base_plus_adapter(tmp_path):
  """configs/hf/eval.py with --config.lora=ADAPTER_DIR reports the mean NLL transformers + peft
  give the same texts."""
  pytest.importorskip('tokenizers')
  folder = str(tmp_path / 'model')
  tok = train_bpe(TEXTS * 4, folder, vocab_size=300)
  base = reference.make_model('llama', folder, vocab_size=tok.vocab_size)
  hf = peft_model(base, r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'down_proj'])
  hf.save_pretrained(str(tmp_path / 'adapter'))
  total = count = 0
  for text in TEXTS:
    ids = tok.encode(text)
    with torch.no_grad():
      logits = hf(torch.as_tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), ids[1:]]
    total, count = total - float(logp.sum()), count + len(ids) - 1
  eval_file = tmp_path / 'texts.jsonl'
  eval_file.write_text('\n'.join(json.dumps({'text': t}) for t in TEXTS) + '\n')
  config = load_config(os.path.join(REPO_ROOT, 'configs/hf/eval.py') + f':path={folder},runlocal')
  config.update(eval_file=str(eval_file), lora=str(tmp_path / 'adapter'))
  config.evals.generations.max_new_tokens = 4
  config.parallel.num_devices = 1
  main.run_experiment(config, str(tmp_path / 'wd'))
  results = json.loads((tmp_path / 'wd' / 'results.json').read_text())
  assert results['tokens'] == count
  np.testing.assert_allclose(results['mean_nll'], total / count, rtol=1e-5)
