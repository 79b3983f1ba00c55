"""moejax.analysis: hand-computed statistics of a hand-built routing, a model's routing read back,
the figures written, and `moejax analyze` end to end."""
import json

import jax
import matplotlib.image
import numpy as np
import pytest

from moejax import cli
from moejax.analysis import LayerRouting, figures, route_tokens, stats, token_rows
from moejax.analysis.routes import with_eval_capacity
from moejax.models import ModelConfig, make_model

EXPERT = np.array([[0, 1], [0, 2], [1, 0], [1, 2], [2, 1]])  # [T=5, K=2], first choices 0 0 1 1 2


def _routing(chosen=None, dispatched=None, probs=None):
  chosen = np.ones(EXPERT.shape, bool) if chosen is None else chosen
  dispatched = chosen if dispatched is None else dispatched
  probs = np.full((5, 3), 1 / 3) if probs is None else probs
  return LayerRouting(expert=EXPERT, weight=np.where(dispatched, 0.5, 0.0), chosen=chosen,
                      dispatched=dispatched, probs=probs)


def test_agreement_by_hand():
  a = stats.agreement(_routing())
  # pairs (0,0) (0,1) (1,1) (1,2): 2 of 4 share the first choice; usage p = (.4, .4, .2).
  assert a['same_first'] == pytest.approx(0.5)
  assert a['same_first_chance'] == pytest.approx(0.16 + 0.16 + 0.04)
  # next first choice among the previous token's choices: 0 in {0,1}, 1 in {0,2} no, 1 in {1,0},
  # 2 in {1,2}: 3 of 4. q (share of tokens choosing e at all) = (.6, .8, .6).
  assert a['first_in_top_k'] == pytest.approx(0.75)
  assert a['first_in_top_k_chance'] == pytest.approx(0.4 * 0.6 + 0.4 * 0.8 + 0.2 * 0.6)


def test_agreement_counts_only_chosen_second_choices():
  chosen = np.ones(EXPERT.shape, bool)
  chosen[3, 1] = False  # token 3 (random routing) kept only expert 1; token 4's first is 2
  a = stats.agreement(_routing(chosen))
  assert a['first_in_top_k'] == pytest.approx(0.5)
  assert a['first_in_top_k_chance'] == pytest.approx(0.4 * 0.6 + 0.4 * 0.8 + 0.2 * 0.4)


def test_router_stats_by_hand():
  probs = np.array([[1, 0, 0], [1, 0, 0], [1 / 3] * 3, [1 / 3] * 3, [0.5, 0.5, 0]])
  dispatched = np.ones(EXPERT.shape, bool)
  dispatched[1, 1] = dispatched[4, 0] = False
  r = stats.router_stats(_routing(dispatched=dispatched, probs=probs))
  assert r['entropy'] == pytest.approx((2 * np.log(3) + np.log(2)) / 5)
  assert r['max_entropy'] == pytest.approx(np.log(3))
  # probability of the first choice: 1, 1, 1/3, 1/3, and token 4's first choice (2) has 0.
  assert r['first_choice_probability'] == pytest.approx((2 + 2 / 3) / 5)
  assert r['fraction_dropped'] == pytest.approx(2 / 10)


def test_byte_class_usage_by_hand():
  ids = np.frombuffer(b'aA a1', np.uint8).astype(int) + stats.BYTE_OFFSET
  classes, names = stats.byte_classes(ids)
  assert [names[c] for c in classes] == ['lowercase', 'uppercase', 'space', 'lowercase', 'digit']
  u = stats.class_usage(_routing(), classes, names)
  assert u['classes'] == ['lowercase', 'uppercase', 'digit', 'space']  # present ones, in order
  assert u['tokens'] == [2, 1, 1, 1]
  np.testing.assert_allclose(u['usage'][0], [0.5, 0.5, 0.0])  # 'a' -> 0 and 'a' -> 1
  np.testing.assert_allclose(u['overall'], [0.4, 0.4, 0.2])
  np.testing.assert_allclose(u['above_chance'][0], [0.1, 0.1, -0.2])
  np.testing.assert_allclose(u['usage'][2], [0.0, 0.0, 1.0])  # '1' -> expert 2


def test_frequency_classes_bucket_by_rank():
  ids = np.concatenate([np.full(20 - i, i) for i in range(12)])  # id i occurs 20 - i times
  classes, names = stats.frequency_classes(ids)
  assert names[:2] == ('rank 1-10', 'rank 11-100')
  assert set(classes[ids < 10]) == {0} and set(classes[ids >= 10]) == {1}


def test_top_tokens_counts_and_shares():
  routing = _routing()
  ids = np.array([7, 7, 8, 7, 8])
  top = stats.top_tokens(routing, ids, min_occurrences=1)
  assert top[0] == [(7, 2, pytest.approx(2 / 3))]  # expert 0 took tokens 0, 1 (both 7)
  assert top[1] == [(7, 1, pytest.approx(1 / 3)), (8, 1, pytest.approx(1 / 2))]
  assert stats.top_tokens(routing, ids, min_occurrences=3)[2] == []  # 8 occurs twice


def test_token_purity_by_hand():
  # id 7 goes to experts 0, 0, 1 (best: 2 of 3); id 8 to 1, 2 (best: 1 of 2).
  assert stats.token_purity(_routing(), np.array([7, 7, 8, 7, 8])) == pytest.approx(3 / 5)
  assert stats.token_purity(_routing(), np.array([1, 1, 2, 2, 3])) == 1.0  # routed by id


def _tiny(scan_layers=False, **fields):
  config = ModelConfig(kind='decoder', vocab_size=40, num_layers=4, model_dim=16, num_heads=2,
                       ffn_dim=32, moe_every=2, num_experts=4, num_selected_experts=2,
                       eval_capacity_factor=0.5, scan_layers=scan_layers, **fields)
  rows = np.zeros((1, 8), np.int32)
  params = make_model(config).init(jax.random.key(0), rows, rows > -1, True)['params']
  return config, params


@pytest.mark.slow
def test_route_tokens_reads_every_layer_in_text_order():
  config, params = _tiny()
  ids = np.random.default_rng(0).integers(3, 40, size=21)
  routes = route_tokens(config, params, ids, length=8)  # 3 rows, the last padded
  assert list(routes) == ['decoder/unit_0/block_1', 'decoder/unit_1/block_1']
  for r in routes.values():
    assert r.expert.shape == (21, 2) and r.probs.shape == (21, 4)
    np.testing.assert_allclose(r.probs.sum(-1), 1, atol=1e-5)
    np.testing.assert_array_equal(r.first_choice, r.probs.argmax(-1))
    assert r.chosen.all() and not r.dispatched.all()  # capacity 0.5 drops some choices
  dropless = route_tokens(with_eval_capacity(config, None), params, ids, length=8)
  assert all(r.dispatched.all() for r in dropless.values())
  # The first MoE layer sees the same inputs whatever the capacity (later ones do not).
  np.testing.assert_array_equal(dropless['decoder/unit_0/block_1'].expert,
                                routes['decoder/unit_0/block_1'].expert)
  # Row by row gives the same routing: each row is routed on its own (causal groups per row).
  first_row = route_tokens(config, params, ids[:8], length=8)
  np.testing.assert_array_equal(first_row['decoder/unit_1/block_1'].expert,
                                routes['decoder/unit_1/block_1'].expert[:8])
  rows, mask = token_rows(ids, 8)
  assert rows.shape == (3, 8) and mask.sum() == 21 and (rows[mask] == ids).all()


@pytest.mark.slow
def test_route_tokens_same_with_scanned_layers():
  config, params = _tiny()
  scanned, _ = _tiny(scan_layers=True)
  stacked = {'decoder': {'units': jax.tree.map(lambda *p: np.stack(p),
                                               params['decoder']['unit_0'],
                                               params['decoder']['unit_1']),
                         'final_norm': params['decoder']['final_norm']},
             'embed': params['embed'], 'logits': params['logits']}
  ids = np.arange(3, 19)
  plain, scan = route_tokens(config, params, ids, 8), route_tokens(scanned, stacked, ids, 8)
  assert list(plain) == list(scan)
  for name in plain:
    np.testing.assert_array_equal(plain[name].expert, scan[name].expert)


@pytest.mark.slow
def test_route_tokens_refuses_routing_without_first_choices():
  config, params = _tiny(routing='dense')
  with pytest.raises(ValueError, match="model.routing='dense'"):
    route_tokens(config, params, np.arange(3, 11), 8)


def _is_image(path):
  image = matplotlib.image.imread(path)
  return image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50


def test_figures_are_written(tmp_path):
  routing = _routing()
  pieces = list('ab\ncd')
  figures.colored_text_png(tmp_path / 'text.png', pieces, {'l0': routing.first_choice,
                                                           'l1': routing.expert[:, 1]}, 3)
  figures.colored_text_html(tmp_path / 'text.html', pieces, {'l0': routing.first_choice},
                            {'l0': routing.weight[:, 0]}, 3)
  classes, names = stats.byte_classes(np.frombuffer(b'aA a1', np.uint8) + 3)
  figures.class_usage_png(tmp_path / 'classes.png',
                          {'l0': stats.class_usage(routing, classes, names)})
  figures.agreement_png(tmp_path / 'agreement.png', {'l0': stats.agreement(routing)},
                        {'reference': (0.1, 0.2)})
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    for step in range(1, 31):
      f.write(json.dumps({'step': step, 'split': 'train', 'expert_usage/l0': [0.5, 0.3, 0.2]})
              + '\n')
    f.write(json.dumps({'step': 30, 'split': 'eval', 'expert_usage/l0': [1, 0, 0]}) + '\n')
  series = figures.usage_over_training(tmp_path / 'metrics.jsonl')
  assert list(series) == ['l0'] and series['l0'][1].shape == (30, 3)
  figures.usage_over_training_png(tmp_path / 'usage.png', series)
  for name in ('text.png', 'classes.png', 'agreement.png', 'usage.png'):
    assert _is_image(tmp_path / name), name
  page = (tmp_path / 'text.html').read_text()
  assert page.count('<span class="e0" title=') == 2 and '<h3>l0</h3>' in page


@pytest.mark.slow
def test_analyze_command_end_to_end(smoke_run, tmp_path, capsys):
  workdir = smoke_run[0]
  text = tmp_path / 'text.txt'
  text.write_text('It was a dark and stormy night; the rain fell in torrents.\n' * 4)
  capsys.readouterr()
  assert cli.main(['moejax', 'analyze', '--workdir', str(workdir), '--text', str(text),
                   '--out', str(tmp_path / 'out')]) == 0
  out = capsys.readouterr().out
  assert 'same first choice' in out and 'token purity' in out
  report = json.loads((tmp_path / 'out' / 'routing.json').read_text())
  assert report['tokens'] == len(text.read_text()) and report['step'] == 5
  (layer,) = report['layers'].values()
  assert 0 <= layer['agreement']['same_first'] <= 1
  assert layer['router_dropless']['fraction_dropped'] == 0
  assert sum(layer['class_usage']['tokens']) == report['tokens']
  for name in ('colored_text.png', 'class_usage.png', 'agreement.png', 'usage_over_training.png'):
    assert _is_image(tmp_path / 'out' / name), name
  assert (tmp_path / 'out' / 'colored_text.html').stat().st_size > 1000
  assert cli.main(['moejax', 'analyze', '--workdir', str(workdir), '--text', str(text),
                   '--out', str(tmp_path / 'init'), '--at_init']) == 0
  assert json.loads((tmp_path / 'init' / 'routing.json').read_text())['step'] == 0
