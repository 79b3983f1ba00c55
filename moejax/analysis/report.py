"""`moejax analyze`: the routing of a trained run on a text, as routing.json and figures."""
from __future__ import annotations

import json
import os

import numpy as np

from moejax.analysis import figures, stats
from moejax.analysis.routes import LayerRouting, route_tokens, with_eval_capacity
from moejax.data.tokenizers import ByteTokenizer
from moejax.errors import InputError

# Mixtral (Jiang et al. 2024, Table 5): consecutive tokens with the same first choice, 8 experts,
# top-2, across its evaluation corpora; 12.5% by chance under uniform usage.
MIXTRAL_SAME_FIRST = {'Mixtral first layer': (0.136, 0.149), 'Mixtral last layer': (0.236, 0.284)}
SHOWN_TOKENS = 640  # tokens drawn in the coloured text


def validation_text(run, num_chars: int) -> str:
  """The first `num_chars` characters of the run's validation split."""
  import tensorflow_datasets as tfds

  from moejax import data as data_lib
  text = ''
  for doc in tfds.as_numpy(data_lib.documents(run.config.data, run.config.data.eval_split)):
    text += doc.decode('utf-8') + '\n'
    if len(text) >= num_chars:
      break
  return text[:num_chars]


def layer_report(routing: LayerRouting, dropless: LayerRouting, token_ids: np.ndarray,
                 tokenizer) -> dict:
  """One layer's numbers: agreement, router statistics (at the eval capacity factor and
  dropless), token purity, usage by token class and each expert's most frequent tokens."""
  if isinstance(tokenizer, ByteTokenizer):
    classes, names = stats.byte_classes(token_ids)
  else:
    classes, names = stats.frequency_classes(token_ids)
  top = stats.top_tokens(routing, token_ids)
  return {'agreement': stats.agreement(routing), 'router': stats.router_stats(routing),
          'token_purity': stats.token_purity(routing, token_ids),
          'router_dropless': stats.router_stats(dropless),
          'usage': stats.usage(routing.first_choice, routing.num_experts).tolist(),
          'class_usage': stats.class_usage(routing, classes, names),
          'top_tokens': [[{'token': tokenizer.decode([i]), 'times': n, 'share': share}
                          for i, n, share in expert] for expert in top]}


def analyze_run(workdir: str, text: str | dict[str, str] | None = None, out: str | None = None,
                step: int | None = None, max_tokens: int = 4096, config=None,
                at_init: bool = False, stop=None) -> dict | None:
  """Route `text` (default: the start of the validation split) through the run's checkpoint
  (`step`, default the latest), with the run's own tokenizer, and write routing.json and the
  figures into `out` (default <workdir>/analysis). `text` may be several named texts ({name:
  text}): the layers' report and the coloured text are the first's, and routing.json's 'texts'
  holds each one's expert usage and agreement per layer (usage_by_text.png: Mixtral Fig. 7).
  `config`: the run's (default: its saved config.json). `at_init`: route through the run's
  initial parameters instead (the untrained baseline: what the router does before it learns
  anything). Returns the report written to routing.json; None, having written nothing, when
  `stop` (a `moejax.train.stopping.StopRequest`) asks to stop before the writing."""
  from moejax.train.config import saved_config
  from moejax.train.resume import load
  from moejax.train.run import open_run
  from moejax.train.stopping import agreed_stop
  stopped = lambda: stop is not None and bool(agreed_stop(stop))
  config = config or saved_config(workdir)
  if at_init:
    run = open_run(config, workdir)
    state = run.fresh_state()
  else:
    run, state = load(config, workdir, step)
  if text is None:
    text = validation_text(run, 4 * max_tokens)
  texts = text if isinstance(text, dict) else {'text': text}
  ids = {name: run.tokenizer.document(body)[:-1][:max_tokens] for name, body in texts.items()}
  for name, token_ids in ids.items():
    if len(token_ids) < 2:
      which = f' ({name})' if len(ids) > 1 else ''
      raise InputError(f'the text to analyze{which} has {len(token_ids)} token(s); it needs at '
                       'least 2')
  model_config, length = run.model_config, run.config.data.length
  route = lambda factor, token_ids: route_tokens(with_eval_capacity(model_config, factor),
                                                 state.params, token_ids, length,
                                                 state.balancing_bias_state)
  by_text = {name: route(model_config.eval_capacity_factor, token_ids)
             for name, token_ids in ids.items()}
  token_ids, routes = ids[next(iter(ids))], by_text[next(iter(ids))]
  if stopped():
    return None
  dropless = route(None, token_ids)
  if stopped():
    return None
  out = out or os.path.join(workdir, 'analysis')
  os.makedirs(out, exist_ok=True)
  report = {'workdir': os.path.abspath(workdir), 'step': int(state.step),
            'tokens': int(len(token_ids)), 'eval_capacity_factor': model_config.eval_capacity_factor,
            'num_experts': model_config.num_experts,
            'num_selected_experts': model_config.num_selected_experts,
            'layers': {name: layer_report(routes[name], dropless[name], token_ids, run.tokenizer)
                       for name in routes}}
  if len(texts) > 1:
    report['texts'] = {text_name: {'tokens': int(len(ids[text_name])), 'layers': {
        name: {'usage': stats.usage(r.first_choice, r.num_experts).tolist(),
               'agreement': stats.agreement(r)} for name, r in text_routes.items()}}
        for text_name, text_routes in by_text.items()}
  with open(os.path.join(out, 'routing.json'), 'w') as f:
    json.dump(report, f, indent=1)
  write_figures(out, report, routes, token_ids, run.tokenizer, None if at_init else workdir)
  return report


def write_figures(out: str, report: dict, routes: dict[str, LayerRouting], token_ids: np.ndarray,
                  tokenizer, workdir: str | None = None):
  """colored_text.png/.html, class_usage.png, agreement.png, usage_by_text.png when the report
  has several texts, and usage_over_training.png when `workdir` has a metrics.jsonl."""
  shown = token_ids[:SHOWN_TOKENS]
  pieces = [tokenizer.decode([i]) for i in shown]
  first = {name: r.first_choice[:len(shown)] for name, r in routes.items()}
  num_experts = report['num_experts']
  figures.colored_text_png(os.path.join(out, 'colored_text.png'), pieces, first, num_experts)
  figures.colored_text_html(os.path.join(out, 'colored_text.html'), pieces, first,
                            {name: r.weight[:len(shown), 0] for name, r in routes.items()},
                            num_experts)
  layers = report['layers']
  figures.class_usage_png(os.path.join(out, 'class_usage.png'),
                          {name: layer['class_usage'] for name, layer in layers.items()})
  figures.agreement_png(os.path.join(out, 'agreement.png'),
                        {name: layer['agreement'] for name, layer in layers.items()},
                        MIXTRAL_SAME_FIRST if num_experts == 8 else None)
  if 'texts' in report:
    figures.usage_by_text_png(os.path.join(out, 'usage_by_text.png'), {
        text: {name: layer['usage'] for name, layer in entry['layers'].items()}
        for text, entry in report['texts'].items()})
  metrics = os.path.join(workdir, 'metrics.jsonl') if workdir else None
  if metrics and os.path.exists(metrics):
    figures.usage_over_training_png(os.path.join(out, 'usage_over_training.png'),
                                    figures.usage_over_training(metrics))
