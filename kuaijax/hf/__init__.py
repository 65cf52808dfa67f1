"""Hugging Face interop: safetensors import/export of Llama, Mistral, Qwen2/3 and their MoE
siblings (`model_io`), HF `tokenizer.json` tokenizers and Jinja chat templates (`tokenizer`).

The import path needs neither torch nor transformers (safetensors are read directly); the
tokenizer needs the `tokenizers` and `jinja2` packages (the `[hf]` extra).
"""
