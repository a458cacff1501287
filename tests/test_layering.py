"""The import layering, checked from the source (no module is imported): every `import` of a
project module -- at the top of a file or inside a function -- must point down the layers, and
no set of modules may import each other in a cycle.

Layers, lowest first (a module may import its own layer and those below):
  data/ < models/ < train/ < configs/, benchmarks/, launch.py, tests/
Inside train/, by rank (the same rule):
  0  config_lib, partitioning, metrics, checkpoint, launching, storage, optim, preflight,
     record (foundations)
  1  families (the Family contract, train/families/__init__.py), evals/*
  2  trainer                                                     (the one loop)
  3  runs                                                        (finished runs as inputs)
  4  families/<name>                                             (the families)
  5  sweep, evaluator, transfer, dynamic, cross_family           (orchestration)
  6  modes (the dispatcher, train/modes/__init__.py), modes/<name> (the modes)
Nothing in train/ outside train/modes/ imports it, and launch.py imports of train/ only the
dispatcher and the foundations (config_lib for the config, checkpoint and storage for the
errors it reports as a user's mistake).
configs/ may import configs, models and data only (a config builds no family).
"""
import ast
import os

from conftest import ROOT

PACKAGE_RANK = {'data': 0, 'models': 1, 'train': 2, 'configs': 3, 'benchmarks': 3,
                'launch': 3, 'tests': 3}
TRAIN_RANK = {'config_lib': 0, 'partitioning': 0, 'metrics': 0, 'checkpoint': 0, 'storage': 0,
              'launching': 0, 'optim': 0, 'preflight': 0, 'record': 0, 'hooks': 0, 'families': 1,
              'evals': 1, 'trainer': 2, 'runs': 3,
              'sweep': 5, 'evaluator': 5, 'transfer': 5, 'cross_family': 5, 'dynamic': 5,
              'modes': 6}
WHY = {
    'data': 'data/ is the bottom layer: it reads and encodes text and knows no model or trainer',
    'models': 'models/ are Flax modules and their math: they may use data/, never the trainer',
    'configs': 'a config file only declares values (it may read models/ for their defaults); '
               'steps, FLOPs and families are resolved by the trainer',
    'train': 'inside train/ the ranks are: foundations (config_lib, partitioning, metrics, storage, '
             'checkpoint, launching, optim, preflight, record, hooks) < the Family contract and evals/ < trainer < runs < '
             'families/<name> < sweep, evaluator, transfer, cross_family < modes (the dispatcher and '
             'the modes, train/modes/)',
}


def module_files():
  """{'train.families.hat': path, ...} for every project module."""
  out = {}
  for top in ('data', 'models', 'train', 'configs', 'benchmarks', 'tests'):
    for d, _, files in os.walk(os.path.join(ROOT, top)):
      if '__pycache__' in d:
        continue
      for f in files:
        if f.endswith('.py'):
          rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, '.')
          out[rel.removesuffix('.__init__')] = os.path.join(d, f)
  out['launch'] = os.path.join(ROOT, 'launch.py')
  return out


def imports(path, modules):
  """[(imported project module, line, 'top' | 'in a function')] of one file."""
  tree = ast.parse(open(path).read(), path)
  top = {id(n) for n in tree.body}
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f'{node.module}.{a.name}' for a in node.names]
      names = [n if n in modules else node.module for n in names]
    else:
      continue
    for n in names:
      while n and n not in modules:  # 'train.families.Family' -> 'train.families'
        n = n.rpartition('.')[0]
      if n:
        out.append((n, node.lineno, 'top' if id(node) in top else 'in a function'))
  return out


def rank(module):
  parts = module.split('.')
  top = PACKAGE_RANK[parts[0]]
  if parts[0] != 'train' or len(parts) == 1:
    return (top, 0)
  if parts[1] == 'families' and len(parts) > 2:
    return (top, 4)
  if parts[1] not in TRAIN_RANK:
    raise AssertionError(f'train/{parts[1]} has no rank: add it to TRAIN_RANK in '
                         'tests/test_layering.py (and to the README\'s layering paragraph)')
  return (top, TRAIN_RANK[parts[1]])


def violation(src, dst):
  """Why `src` may not import `dst`, or None."""
  if src.startswith('configs') and dst.split('.')[0] not in ('configs', 'models', 'data'):
    return WHY['configs']
  if src.startswith(('tests', 'benchmarks', 'launch')):
    return None
  if rank(dst) > rank(src):
    layer = src.split('.')[0]
    return WHY['train'] if layer == dst.split('.')[0] == 'train' else WHY[layer]
  return None


def graph():
  modules = module_files()
  return modules, {m: imports(p, modules) for m, p in modules.items()}


def cycles(edges):
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w, _, _ in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def layering_problems(modules, edges):
  problems = []
  for src in sorted(edges):
    for dst, line, where in edges[src]:
      why = violation(src, dst)
      if why:
        problems.append(f'{os.path.relpath(modules[src], ROOT)}:{line} imports {dst} '
                        f'({where}): an upward import. {why}.')
  for comp in cycles(edges):
    inside = [f'{s} -> {d} ({os.path.relpath(modules[s], ROOT)}:{line}, {where})'
              for s in comp for d, line, where in edges[s] if d in comp]
    problems.append('import cycle among ' + ', '.join(comp) + ':\n    ' + '\n    '.join(inside)
                    + '\n  Move the shared code down a layer (or into the module that owns '
                    'it) instead of hiding the edge in a function-level import.')
  return problems


def test_layers_point_down_and_nothing_cycles():
  modules, edges = graph()
  assert len(modules) > 40 and 'train.families.hat' in modules
  problems = layering_problems(modules, edges)
  assert not problems, '\n' + '\n'.join(problems)


# Inside models/: the byte-level package (models/byte_level/: the ByteLM interface, the token-LM
# views, exact BPE, ensembles) knows no model family. From models/ it imports itself and these
# building blocks only; each family builds its own view (`Family.byte_view`), and a family's
# model modules may import the package (models/hat_view.py, models/pretrained.py), never the
# other way round.
BYTE_LEVEL = 'models.byte_level'
BYTE_LEVEL_MAY_IMPORT = ('models.layers', 'models.transformer')


def byte_level_problems(modules, edges):
  problems = []
  for src in sorted(edges):
    if src != BYTE_LEVEL and not src.startswith(BYTE_LEVEL + '.'):
      continue
    for dst, line, where in edges[src]:
      if (dst.startswith('models.') and dst != BYTE_LEVEL
          and not dst.startswith(BYTE_LEVEL + '.') and dst not in BYTE_LEVEL_MAY_IMPORT):
        problems.append(f'{os.path.relpath(modules[src], ROOT)}:{line} imports {dst} ({where}): '
                        'the byte-level package knows no model family; the family builds its '
                        'view (Family.byte_view) and its model modules import the package')
  return problems


def test_the_byte_level_package_imports_no_model_family():
  modules, edges = graph()
  assert {BYTE_LEVEL, f'{BYTE_LEVEL}.interface', f'{BYTE_LEVEL}.token_views',
          f'{BYTE_LEVEL}.exact_bpe', f'{BYTE_LEVEL}.ensembles'} <= set(modules)
  problems = byte_level_problems(modules, edges)
  assert not problems, '\n' + '\n'.join(problems)
  # the views that need a family's model live next to it and import the package
  for family_view in ('models.hat_view', 'models.pretrained'):
    assert any(d == BYTE_LEVEL or d.startswith(BYTE_LEVEL + '.')
               for d, _, _ in edges[family_view]), family_view
  edges = {k: list(v) for k, v in edges.items()}  # the checker names a family import
  edges[f'{BYTE_LEVEL}.interface'].append(('models.hat', 5, 'in a function'))
  edges[BYTE_LEVEL].append(('models.lexinvariant', 9, 'top'))
  problems = byte_level_problems(modules, edges)
  assert len(problems) == 2 and problems[0].startswith(
      'models/byte_level/__init__.py:9 imports models.lexinvariant (top): the byte-level package '
      'knows no model family') and 'interface.py:5 imports models.hat (in a function)' in \
      problems[1], problems


def test_the_checker_names_an_upward_import_and_a_cycle():
  modules, edges = graph()
  edges = {k: list(v) for k, v in edges.items()}
  edges['data.corpus'].append(('train.trainer', 7, 'in a function'))
  edges['train.trainer'].append(('train.sweep', 9, 'top'))
  problems = layering_problems(modules, edges)
  assert any(p.startswith('data/corpus.py:7 imports train.trainer (in a function): an upward '
                          'import. data/ is the bottom layer') for p in problems), problems
  assert any('train/trainer.py:9 imports train.sweep (top): an upward import. inside train/'
             in p for p in problems), problems
  assert any(p.startswith('import cycle among') and 'train.sweep -> train.trainer' in p
             for p in problems), problems


def test_modes_sit_on_top_and_launch_imports_only_the_dispatcher():
  modes, edges = graph()
  assert 'train.modes' in modes and 'train.modes.train' in modes
  inside = [f'{src} imports {dst} ({os.path.relpath(modes[src], ROOT)}:{line})'
            for src in sorted(edges) if src.startswith('train.')
            and not (src == 'train.modes' or src.startswith('train.modes.'))
            for dst, line, _ in edges[src] if dst == 'train.modes' or dst.startswith('train.modes.')]
  assert not inside, 'only train/modes/ and launch.py import the modes:\n' + '\n'.join(inside)
  allowed = {'train.modes'} | {f'train.{m}' for m, r in TRAIN_RANK.items() if r == 0}
  wrong = [f'launch.py:{line} imports {dst}' for dst, line, _ in edges['launch']
           if dst.startswith('train') and dst not in allowed]
  assert not wrong, ('launch.py is flags and dispatch: it imports the modes\' dispatcher '
                     '(train.modes) and the foundations only; a mode\'s work goes into its '
                     'module in train/modes/:\n' + '\n'.join(wrong))
