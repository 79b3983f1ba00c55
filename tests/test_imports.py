"""The house's layering: no import cycle among moejax's modules, counting every import statement
(those inside functions too: they are arrows all the same), and the arrows DESIGN.md draws."""
import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, 'moejax')


def _modules() -> dict[str, str]:
  """{dotted module name: file} of every module of the package."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(root, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, '.')
        found[dotted.removesuffix('.__init__')] = path
  return found


def import_graph() -> dict[str, set[str]]:
  """{module: the moejax modules it imports}; `from moejax.a import b` names moejax.a.b when b is
  a module, else moejax.a (the package, whose __init__ imports its own modules)."""
  modules = _modules()
  graph = {}
  for module, path in modules.items():
    targets = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        targets |= {alias.name for alias in node.names}
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
          submodule = f'{node.module}.{alias.name}'
          targets.add(submodule if submodule in modules else node.module)
    graph[module] = {t for t in targets if t in modules and t != module}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle of `graph` as [a, b, ..., a], or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 'open':
        return stack[stack.index(target):] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one_and_only_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_no_import_cycle_in_moejax():
  assert find_cycle(import_graph()) is None


def test_layering_arrows():
  graph = import_graph()
  assert 'moejax.cli' not in set().union(*(graph[m] for m in graph if m != 'moejax.cli'))
  assert 'moejax.train.step' not in graph['moejax.train.sharding']
  for low in ('moejax.routing', 'moejax.routers', 'moejax.dispatch', 'moejax.experts',
              'moejax.layer', 'moejax.models.config', 'moejax.models.transformer'):
    assert not {t for t in graph[low] if t.startswith(('moejax.train', 'moejax.data',
                                                        'moejax.ablate', 'moejax.analysis'))}, low
