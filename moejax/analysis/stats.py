"""Statistics of a layer's routing (NumPy): agreement of consecutive tokens, router entropy and
confidence, dropped choices, and expert usage by token class."""
from __future__ import annotations

import string

import numpy as np

from moejax.analysis.routes import LayerRouting

BYTE_CLASSES = ('lowercase', 'uppercase', 'digit', 'space', 'newline', 'punctuation', 'other')
BYTE_OFFSET = 3  # moejax's byte tokenizer: id = byte + 3
FREQUENCY_BUCKETS = (10, 100, 1000)  # ranks that end a bucket: top 10, 11-100, 101-1000, rarer


def usage(experts: np.ndarray, num_experts: int) -> np.ndarray:
  """[E]: the share of the tokens whose entry in `experts` [T] is each expert."""
  return np.bincount(experts, minlength=num_experts) / max(len(experts), 1)


def agreement(routing: LayerRouting) -> dict[str, float]:
  """How often consecutive tokens (t, t + 1) share an expert, against chance (Mixtral Table 5).

  same_first: token t + 1's first choice is token t's first choice.
  first_in_top_k: token t + 1's first choice is among token t's chosen experts.
  The chance rates are those of independent tokens with the measured usage: sum_e p_e^2, and
  sum_e p_e q_e, p_e the first-choice usage and q_e the share of tokens that chose e at all.
  """
  first, num_experts = routing.first_choice, routing.num_experts
  picked = np.zeros((len(first), num_experts), bool)  # [T, E]: the experts each token chose
  np.put_along_axis(picked, routing.expert, routing.chosen, axis=1)
  p = usage(first, num_experts)
  q = picked.mean(axis=0)
  return {'same_first': float(np.mean(first[1:] == first[:-1])),
          'same_first_chance': float(np.sum(p * p)),
          'first_in_top_k': float(np.mean(picked[np.arange(len(first) - 1), first[1:]])),
          'first_in_top_k_chance': float(np.sum(p * q))}


def token_purity(routing: LayerRouting, token_ids: np.ndarray) -> float:
  """The share of tokens whose first choice is their token id's most frequent first choice: 1
  when the router routes by token identity alone (as hash routing does); about the largest
  expert's usage when it ignores the token."""
  pairs, counts = np.unique(np.stack([np.asarray(token_ids), routing.first_choice], axis=1),
                            axis=0, return_counts=True)  # [P, 2] (token id, expert), [P]
  best = np.zeros(pairs[:, 0].max() + 1, int)  # [max id + 1]: each id's most frequent expert
  np.maximum.at(best, pairs[:, 0], counts)
  return float(best.sum() / len(routing.first_choice))


def router_stats(routing: LayerRouting) -> dict[str, float]:
  """Mean router entropy (nats; log E at uniform), mean first-choice probability, and the share
  of chosen (token, expert) choices dropped by capacity."""
  probs = routing.probs
  entropy = -np.sum(np.where(probs > 0, probs * np.log(np.maximum(probs, 1e-30)), 0.0), axis=-1)
  first_prob = np.take_along_axis(probs, routing.first_choice[:, None], axis=1)
  chosen = routing.chosen.sum()
  return {'entropy': float(entropy.mean()), 'max_entropy': float(np.log(routing.num_experts)),
          'first_choice_probability': float(first_prob.mean()),
          'fraction_dropped': float(1 - routing.dispatched.sum() / max(chosen, 1))}


def byte_class(byte: int) -> str:
  char = chr(byte)
  if byte >= 128:
    return 'other'
  if char in string.ascii_lowercase:
    return 'lowercase'
  if char in string.ascii_uppercase:
    return 'uppercase'
  if char in string.digits:
    return 'digit'
  if char == '\n':
    return 'newline'
  if char in ' \t\r':
    return 'space'
  return 'punctuation' if char in string.punctuation else 'other'


def byte_classes(token_ids: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  """(class index [T], class names) of byte-tokenizer ids, by character kind."""
  table = np.array([BYTE_CLASSES.index(byte_class(b)) for b in range(256)])
  bytes_ = np.clip(np.asarray(token_ids) - BYTE_OFFSET, 0, 255)
  return table[bytes_], BYTE_CLASSES


def frequency_classes(token_ids: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  """(class index [T], class names) by the token's frequency rank in this text: for vocabularies
  whose pieces have no character kind (SentencePiece)."""
  ids, counts = np.unique(token_ids, return_counts=True)
  rank = np.empty(len(ids), int)
  rank[np.argsort(-counts, kind='stable')] = np.arange(len(ids))
  bucket_of_id = np.searchsorted(FREQUENCY_BUCKETS, rank, side='right')
  ends = (0, *FREQUENCY_BUCKETS)
  names = tuple(f'rank {lo + 1}-{hi}' for lo, hi in zip(ends, ends[1:])) + (
      f'rank > {FREQUENCY_BUCKETS[-1]}',)
  return bucket_of_id[np.searchsorted(ids, token_ids)], names


def class_usage(routing: LayerRouting, classes: np.ndarray, names: tuple[str, ...]) -> dict:
  """First-choice usage by token class: {'classes': the names present, 'tokens': [C] counts,
  'usage': [C, E] P(expert | class), 'overall': [E] P(expert), 'above_chance': [C, E]
  P(expert | class) - P(expert)}, as lists."""
  first, num_experts = routing.first_choice, routing.num_experts
  counts = np.zeros((len(names), num_experts))
  np.add.at(counts, (classes, first), 1)
  present = counts.sum(axis=1) > 0
  counts = counts[present]
  tokens = counts.sum(axis=1)
  by_class = counts / tokens[:, None]
  overall = usage(first, num_experts)
  return {'classes': [n for n, p in zip(names, present) if p], 'tokens': tokens.tolist(),
          'usage': by_class.tolist(), 'overall': overall.tolist(),
          'above_chance': (by_class - overall).tolist()}


def top_tokens(routing: LayerRouting, token_ids: np.ndarray, count: int = 8,
               min_occurrences: int = 5) -> list[list[tuple[int, int, float]]]:
  """For each expert, the `count` tokens it takes most often as first choice: (token id, times,
  share of that token's occurrences sent there), among tokens seen at least `min_occurrences`
  times."""
  first, token_ids = routing.first_choice, np.asarray(token_ids)
  ids, occurrences = np.unique(token_ids, return_counts=True)
  out = []
  for expert in range(routing.num_experts):
    taken_ids, taken = np.unique(token_ids[first == expert], return_counts=True)
    total = occurrences[np.searchsorted(ids, taken_ids)]
    keep = total >= min_occurrences
    order = np.argsort(-taken[keep], kind='stable')[:count]
    out.append([(int(i), int(n), float(n / t)) for i, n, t in
                zip(taken_ids[keep][order], taken[keep][order], total[keep][order])])
  return out
