"""Inference-time methods that only sample and score a trained LM.

answers.py: rule-based answer extraction per answer type; aggregate.py: Self-Consistency (majority
vote), Universal Self-Consistency and Self-Agreement prompts and parsers, k paths in one batched
`generate` call; compare.py: greedy / SC / USC / SA accuracy vs k over sampling seeds; sa_toy.py: the
Self-Agreement toy tasks (training pairs, held-out items); multi_run.py: an evaluation repeated over
seeds (mean ± std, uncertain problems); early_exit.py: intermediate layers through the final norm and
shared LM head (analysis, decoding); exit_sweep.py: the early-exit trade-off over exit settings; gradient_matching.py: many-shot ICL
demonstration selection (per-example gradient features under a random projection, gradient
matching, random / BM25 / k-means baselines).
The evaluators that run them in a pipeline: `kuaijax.evals.self_agreement`, `kuaijax.evals.early_exit`.
"""
