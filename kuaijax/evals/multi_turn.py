"""Multi-turn evaluation: sessions answered turn by turn, per-turn exact match, context sensitivity.

kj_dialog-8 (the toy stand-in for MT-Bench++): held-out kj_dialog sessions cut to 8 turns; the model
answers turn k after seeing turns 1..k-1 with its OWN earlier answers (as MT-Bench evaluates; or
the gold ones), and each answer is compared with the program's exact answer. Reported: accuracy
per turn, overall, on context-dependent and on self-contained turns. The context-sensitivity
measure is, over context-dependent turns, the mean of
  log p(gold answer | full gold history + query) - log p(gold answer | query alone),
i.e. how much the model's belief in the right answer rests on the history (larger = uses context).

Answering is pluggable: any `Answerer` (conversations -> next assistant turns) works; `ModelAnswerer`
generates greedily through the chat layout. A judge-based score for real data lives in
`kuaijax.evals.judge`.
"""

from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from kuaijax import parallel, sampling
from kuaijax.data import chat, dialog, sequences, tasks
from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator

HISTORIES = ('own', 'gold')
Answerer = Callable[[list[list[chat.Message]]], list[str]]


def _chunks(items: Sequence, size: int):
  """Fixed-size chunks, the last one padded with copies of the first item (and its real size)."""
  for start in range(0, len(items), size):
    chunk = list(items[start : start + size])
    yield chunk + [chunk[0]] * (size - len(chunk)), len(chunk)


def generate_turns(
  model: nnx.Module,
  tokenizer,
  conversations: Sequence[Sequence[chat.Message]],
  *,
  next_role: str = 'assistant',
  max_prompt_len: int,
  max_new_tokens: int,
  batch_size: int = 64,
  temperature: float = 0.0,
  seed: int = 0,
  width_multiple: int = 32,
  template: str = 'plain',
) -> tuple[list[str], int]:
  """(next turn of each conversation, number of prompts truncated from the oldest turns).

  Greedy at temperature 0, else sampled (batch b draws with fold_in(key(seed), b)).

  Batches have a fixed size (the last padded with copies) and widths rounded up to a multiple of
  `width_multiple`, so repeated calls reuse compiled programs (max_prompt_len: always one width). Prompts that do not fit max_prompt_len even after
  dropping all older exchanges raise ValueError. A reply cut at max_new_tokens is kept as is.
  """
  prompts, truncated = [], 0
  for i, messages in enumerate(conversations):
    encoded = chat.encode_prompt(
      messages,
      tokenizer,
      next_role=next_role,
      max_len=max_prompt_len,
      template=template,
      allow_empty_answers=True,  # a model's own earlier reply may be empty
    )
    if encoded is None:
      raise ValueError(
        f'conversation {i}: its last turn alone exceeds max_prompt_len={max_prompt_len}'
      )
    prompts.append(encoded[0])
    truncated += encoded[1] > 0
  replies = []
  for b, (chunk, real) in enumerate(_chunks(prompts, batch_size)):
    width = -(-max(len(p) for p in chunk) // width_multiple) * width_multiple
    batch = np.full((len(chunk), width), tokenizer.pad_id, np.int32)
    for row, ids in zip(batch, chunk, strict=True):
      row[: len(ids)] = ids
    out = sampling.generate(
      model,
      batch,
      np.asarray([len(p) for p in chunk], np.int32),
      greedy=temperature == 0,
      temperature=temperature,
      rng=jax.random.fold_in(jax.random.key(seed), b),
      max_new_tokens=max_new_tokens,
      stop_tokens=chat.stop_tokens(tokenizer, next_role, template),
      pad_id=tokenizer.pad_id,
    )
    replies += [tokenizer.decode(ids).strip() for ids in out.to_lists()[:real]]
  return replies, truncated


class ModelAnswerer:
  """An `Answerer` backed by a model's greedy generation; counts truncated prompts."""

  def __init__(self, model, tokenizer, **generate_options):
    self.model, self.tokenizer, self.options = model, tokenizer, generate_options
    self.truncated = 0

  def __call__(self, conversations: list[list[chat.Message]]) -> list[str]:
    replies, truncated = generate_turns(self.model, self.tokenizer, conversations, **self.options)
    self.truncated += truncated
    return replies


def answer_sessions(
  answerer: Answerer, sessions: Sequence[Sequence[dialog.Turn]], *, history: str = 'own'
) -> list[list[str]]:
  """The answerer's reply to every turn of every session, asked turn by turn.

  history='own' shows the answerer its own earlier replies; 'gold' the program's answers.
  """
  if history not in HISTORIES:
    raise ValueError(f'history={history!r}; allowed: {", ".join(HISTORIES)}')
  replies = [[] for _ in sessions]
  for k in range(max((len(s) for s in sessions), default=0)):
    active = [i for i, s in enumerate(sessions) if len(s) > k]
    conversations = []
    for i in active:
      turns = sessions[i][:k]
      messages = chat.session_messages([t.user for t in turns], [t.assistant for t in turns])
      if history == 'own':
        messages = chat.with_answers(messages, replies[i])
      conversations.append([*messages, {'role': 'user', 'content': sessions[i][k].user}])
    for i, reply in zip(active, answerer(conversations), strict=True):
      replies[i].append(reply)
  return replies


def score_answers(
  sessions: Sequence[Sequence[dialog.Turn]], replies: Sequence[Sequence[str]]
) -> dict[str, float]:
  """Exact-match accuracy per turn ('accuracy/turn_k'), overall, and by context dependence."""
  rows = [
    (k, turn.context_dependent, reply.strip() == turn.assistant)
    for session, answers in zip(sessions, replies, strict=True)
    for k, (turn, reply) in enumerate(zip(session, answers, strict=True), 1)
  ]
  if not rows:
    raise ValueError('no turns to score')
  turn, dependent, correct = (np.asarray(x) for x in zip(*rows, strict=True))
  out = {'accuracy': float(correct.mean()), 'turns': len(rows)}
  for name, sel in (('context_dependent', dependent), ('self_contained', ~dependent)):
    out[f'accuracy/{name}'] = float(correct[sel].mean()) if sel.any() else float('nan')
    out[f'count/{name}'] = int(sel.sum())
  for k in sorted(set(turn.tolist())):
    out[f'accuracy/turn_{k}'] = float(correct[turn == k].mean())
  return out


@nnx.jit
def _sequence_logps(model, tokens, mask, segment_ids):
  return sampling.score(model, tokens, loss_mask=mask, segment_ids=segment_ids)[1]


def answer_sequence(
  messages: Sequence[chat.Message], tokenizer, *, seq_len: int, template: str = 'plain'
) -> tuple[np.ndarray, np.ndarray, int, int] | None:
  """(tokens, mask, length, dropped exchanges) scoring only the final answer (`chat.answer_ids`)
  after the rest of the conversation; None when the answer and its query alone exceed seq_len."""
  answer = chat.answer_ids(tokenizer, messages[-1]['content'], template=template)
  prompt = chat.encode_prompt(
    messages[:-1],
    tokenizer,
    next_role='assistant',
    max_len=seq_len - len(answer),
    template=template,
  )
  if prompt is None:
    return None
  tokens, mask = sequences.encode_sequence(prompt[0], answer, seq_len, tokenizer.pad_id)
  return tokens, mask, len(prompt[0]) + len(answer), prompt[1]


def last_answer_logps(
  model,
  tokenizer,
  conversations: Sequence[Sequence[chat.Message]],
  *,
  seq_len: int,
  batch_size: int,
) -> np.ndarray:
  """log p(final answer | everything before it) per conversation (`answer_sequence` layout).

  Conversations longer than seq_len lose their oldest exchanges; one whose last exchange alone
  does not fit raises ValueError.
  """
  rows = []
  for i, messages in enumerate(conversations):
    row = answer_sequence(messages, tokenizer, seq_len=seq_len)
    if row is None:
      raise ValueError(f'conversation {i}: its last exchange alone exceeds seq_len={seq_len}')
    rows.append(row)
  out = []
  for chunk, real in _chunks(rows, batch_size):
    tokens = np.stack([r[0] for r in chunk])
    mask = np.stack([r[1] for r in chunk])
    lengths = np.asarray([r[2] for r in chunk])
    segments = (np.arange(seq_len)[None] < lengths[:, None]).astype(np.int32)
    out.append(parallel.host_value(_sequence_logps(model, tokens, mask, segments))[:real])
  return np.concatenate(out) if out else np.zeros(0, np.float32)


def context_sensitivity(
  model, tokenizer, sessions: Sequence[Sequence[dialog.Turn]], *, seq_len: int, batch_size: int
) -> dict[str, float]:
  """Mean over context-dependent turns of log p(gold | full history) - log p(gold | query alone)."""
  full, alone = [], []
  for session in sessions:
    messages = chat.session_messages([t.user for t in session], [t.assistant for t in session])
    for k, turn in enumerate(session):
      if turn.context_dependent:
        full.append(messages[: 2 * k + 2])
        alone.append(messages[2 * k : 2 * k + 2])
  if not full:
    raise ValueError('no context-dependent turns to measure')
  options = {'seq_len': seq_len, 'batch_size': batch_size}
  gap = last_answer_logps(model, tokenizer, full, **options) - last_answer_logps(
    model, tokenizer, alone, **options
  )
  return {'context_sensitivity': float(gap.mean()), 'count/context_sensitivity': len(full)}


class DialogEvaluator(Evaluator):
  """kj_dialog-8 for the trainer and the pipeline: accuracy per turn and context sensitivity."""

  def __init__(
    self,
    tokenizer,
    sessions: Sequence[Sequence[dialog.Turn]],
    *,
    num_turns: int = 8,
    history: str = 'own',
    seq_len: int,
    max_new_tokens: int,
    batch_size: int = 64,
  ):
    short = [i for i, s in enumerate(sessions) if len(s) < num_turns]
    if short or not sessions:
      raise ValueError(f'need sessions of >= {num_turns} turns; too short: {short[:5]}')
    if history not in HISTORIES:
      raise ValueError(f'history={history!r}; allowed: {", ".join(HISTORIES)}')
    self.tokenizer, self.history = tokenizer, history
    self.sessions = [list(s[:num_turns]) for s in sessions]
    self.seq_len, self.max_new_tokens, self.batch_size = seq_len, max_new_tokens, batch_size

  def evaluate(self, graphdef, params, step: int | None = None) -> dict:
    del step
    model = nnx.merge(graphdef, params)
    answerer = ModelAnswerer(
      model,
      self.tokenizer,
      max_prompt_len=self.seq_len - self.max_new_tokens,
      max_new_tokens=self.max_new_tokens,
      batch_size=self.batch_size,
      width_multiple=self.seq_len - self.max_new_tokens,
    )
    replies = answer_sessions(answerer, self.sessions, history=self.history)
    out = score_answers(self.sessions, replies)
    out['truncated_prompts'] = answerer.truncated
    out.update(
      context_sensitivity(
        model, self.tokenizer, self.sessions, seq_len=self.seq_len, batch_size=self.batch_size
      )
    )
    return out


@register_evaluator('kj_dialog8')
def build(options: dict, ctx) -> DialogEvaluator:
  """Multi-turn exact match per turn with own / gold history, context-dependent split and context
  sensitivity on kj_dialog sessions. Options: split, sessions, num_turns, history, batch_size;
  widths from config.data (seq_len, max_new_tokens)."""
  sessions = tasks.load_dialog_sessions(
    options['split'], limit=options['sessions'], data_dir=ctx.data.data_dir
  )
  return DialogEvaluator(
    ctx.tokenizer,
    sessions,
    num_turns=options['num_turns'],
    history=options['history'],
    seq_len=ctx.data.seq_len,
    max_new_tokens=ctx.data.max_new_tokens,
    batch_size=options['batch_size'],
  )
