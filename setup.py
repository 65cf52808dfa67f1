"""kuaijax: a JAX codebase for dynamic-routing MoE, token-level RL, preference optimisation and
predictor-corrector Transformers."""

from setuptools import find_packages, setup

setup(
  name='kuaijax',
  version='0.1.0',
  description=__doc__,
  # Tested by CI (.ci/run) on two stacks: Python 3.11 with jax 0.10.2 / flax 0.12.8 / numpy 2.4 (the
  # newest jax for 3.11) and Python 3.12 with the newest releases (2026-11-30: jax 0.12.0.1 / flax
  # 0.12.12 / numpy 2.5). The jax and flax lower bounds are the oldest tested releases; no upper
  # bounds: CI's second leg follows the newest releases.
  python_requires='>=3.11',
  classifiers=[
    'Programming Language :: Python :: 3.11',
    'Programming Language :: Python :: 3.12',
  ],
  packages=find_packages(include=['kuaijax*', 'experiments*', 'configs*', 'pallas_kernels*']),
  install_requires=[
    'jax>=0.10.2',
    'flax>=0.12.8',
    'optax>=0.2.5',
    'orbax-checkpoint>=0.11',
    'grain>=0.2.12',
    'tensorflow-datasets>=4.9.9',
    'array_record>=0.8',
    'importlib_resources',  # tfds needs it to build data sets without TensorFlow
    'ml-collections>=1.0',
    'chex>=0.1.90',
    'absl-py>=2.1',
    'numpy>=1.26',
    'sentencepiece>=0.2',
    'tqdm>=4.66',
    'matplotlib>=3.8',
    'tensorboardX>=2.6',
  ],
  extras_require={
    'test': [
      'pytest>=8',
      'pytest-xdist>=3.5',
      'nbclient>=0.10',
      'nbformat>=5.10',
      'ipykernel>=6.29',
      'ruff>=0.6',
    ],
    'gpu': ['jax[cuda12]>=0.10.2'],
    'tpu': ['jax[tpu]>=0.10.2'],
    # Hugging Face tokenizers / chat templates at run time; torch + transformers (+ peft) only as
    # the reference of the parity tests and benchmarks.
    'hf': [
      'tokenizers>=0.20',
      'jinja2>=3.1',
      'safetensors>=0.4',
      'torch>=2.4,<3',
      'transformers>=4.56',
      'peft>=0.17',  # the reference of the LoRA adapter parity tests
    ],
  },
)
