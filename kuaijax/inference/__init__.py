"""Inference-time methods that only sample and score a trained LM.

answers.py: rule-based answer extraction per answer type; aggregate.py: Self-Consistency (majority
vote), Universal Self-Consistency and Self-Agreement prompts and parsers, k paths in one batched
`generate` call; multi_run.py: an evaluation repeated over seeds (mean ± std, uncertain problems);
early_exit.py: intermediate layers through the final norm and shared LM head (analysis, decoding).
"""
