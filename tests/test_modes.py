"""Modes as plug-ins (train/modes/): found by module name behind one dispatcher, each with its
own flags and accepted families; launch.py names none of them, and a new mode is a new module."""
import ast
import os
import re
import sys

import pytest

import launch
from conftest import ROOT, run_launch
from train import modes

HELLO = '''"""Say hello (a mode written by a test)."""
from train import modes


class Mode(modes.Mode):
  devices = False
  families = {families}

  def add_flags(self, flags):
    flags.add_argument('--greeting', default='hello')
    flags.add_argument('--step', type=int, default=None)  # shared with eval, sample, export

  def run(self, args, cfg, module, overrides):
    print(f'{{args.greeting}} {{cfg.family}} step={{args.step}}')
    return 7
'''


def test_every_module_is_a_mode_and_the_choices_are_them():
  here = os.path.join(ROOT, 'train', 'modes')
  files = sorted(f[:-3] for f in os.listdir(here)
                 if f.endswith('.py') and not f.startswith('_'))
  assert modes.names() == files
  assert {'train', 'eval', 'sample', 'sweep', 'sweep_summary', 'evaluator', 'launch',
          'transfer', 'export', 'ensemble', 'report'} <= set(files)
  for name in files:
    mode = modes.get(name)
    assert isinstance(mode, modes.Mode) and mode.name == name and mode.summary, name
  args, _ = launch.parse(['--config=configs/byte_lm.py:tiny', '--workdir=/tmp/x'])
  assert args.mode == modes.DEFAULT == 'train'
  with pytest.raises(ValueError, match="unknown mode 'nonsense'"):
    modes.get('nonsense')


def test_launch_names_no_mode():
  """launch.py is flags and dispatch: no mode's name as a string, no `args.mode ==`."""
  tree = ast.parse(open(os.path.join(ROOT, 'launch.py')).read())
  names = modes.names()
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      assert node.value not in names, node.value
      assert not any(f'mode={n}' in node.value for n in names), node.value
    if isinstance(node, ast.Compare):
      assert 'mode' not in ast.unparse(node), ast.unparse(node)


def test_a_new_mode_is_one_new_module(tmp_path, monkeypatch, capsys):
  """A mode module in a directory of the package's path (standing in for a new file in
  train/modes/): listed, its flags parsed, run by launch.py with its exit status, and its
  families checked by the dispatcher."""
  (tmp_path / 'hello.py').write_text(HELLO.format(families=None))
  (tmp_path / 'pretrained_only.py').write_text(HELLO.format(families="('pretrained',)"))
  (tmp_path / '_helper.py').write_text('')
  monkeypatch.setattr(modes, '__path__', [*modes.__path__, str(tmp_path)])
  for name in ('hello', 'pretrained_only'):
    monkeypatch.delitem(sys.modules, f'train.modes.{name}', raising=False)
  assert 'hello' in modes.names() and '_helper' not in modes.names()
  argv = ['--config=configs/byte_lm.py:tiny', f'--workdir={tmp_path / "w"}', '--mode=hello']
  assert launch.main([*argv, '--greeting=hi', '--step=3']) == 7
  assert capsys.readouterr().out.strip() == 'hi lm step=3'
  with pytest.raises(SystemExit):
    launch.parse([*argv, '--help'])
  out = capsys.readouterr().out
  assert '--mode=hello:\n  --greeting' in out and 'Say hello (a mode written by a test)' in out
  # --step is declared first by eval; the other modes reading it, the new ones included
  also = re.search(r'\(also ([^)]*)\)', ' '.join(out.split()))
  assert also and {'export', 'hello', 'pretrained_only', 'sample'} <= set(also.group(1).split(', '))
  from train import config_lib  # pylint: disable=import-outside-toplevel
  cfg, _ = config_lib.load('configs/byte_lm.py:tiny')
  with pytest.raises(ValueError, match=r"--mode=pretrained_only accepts family pretrained, not "
                                       r"family 'lm' \(config.family\)"):
    modes.check_family(modes.get('pretrained_only'), cfg)
  modes.check_family(modes.get('hello'), cfg)
  monkeypatch.delitem(sys.modules, 'train.modes.hello')
  monkeypatch.delitem(sys.modules, 'train.modes.pretrained_only')


def test_shared_flags_must_agree(monkeypatch, tmp_path):
  (tmp_path / 'clash.py').write_text(HELLO.format(families=None).replace(
      "'--step', type=int", "'--step', type=float"))
  monkeypatch.setattr(modes, '__path__', [*modes.__path__, str(tmp_path)])
  monkeypatch.delitem(sys.modules, 'train.modes.clash', raising=False)
  with pytest.raises(TypeError, match="mode 'eval' declares --step .* mode 'clash' as"):
    launch.parse(['--config=configs/byte_lm.py:tiny', '--workdir=/tmp/x'])
  monkeypatch.delitem(sys.modules, 'train.modes.clash')


def test_a_mode_refuses_another_family_in_one_message(data_dir, tmp_path):
  """Before any device or model is touched: exit 1, the mode, the family and the accepted ones."""
  p = run_launch(data_dir, '--config=configs/byte_lm.py:tiny', f'--workdir={tmp_path / "w"}',
                 '--mode=transfer', check=False)
  assert p.returncode == 1, p.stderr[-2000:]
  assert ("error: --mode=transfer accepts family pretrained, not family 'lm' (config.family)"
          in p.stderr), p.stderr[-2000:]
  assert 'Traceback' not in p.stderr and not os.path.exists(tmp_path / 'w')


def test_another_modes_flag_is_refused_not_ignored():
  """`--submit` or `--sweep` under --mode=train (and `--step` under train) would be silently
  ignored: refused, naming the modes that read the flag; a mode's own flags still pass."""
  from train import config_lib  # pylint: disable=import-outside-toplevel
  base = ['--config=configs/byte_lm.py:tiny', '--workdir=unused']
  for flag in ('--submit', "--sweep=optim.lr=1e-3,3e-3", '--step=3'):
    with pytest.raises(config_lib.ConfigError, match=rf'{flag.split("=")[0]} is read by '
                       r'--mode=.*not by --mode=train'):
      launch.parse([*base, flag])
  assert launch.parse([*base, '--mode=eval', '--step=3'])[0].step == 3
  assert launch.parse([*base, '--mode=launch', '--submit', '--dry'])[0].submit
  p = run_launch('', *base, '--submit', check=False)
  assert p.returncode == 2 and '--submit is read by --mode=launch' in p.stderr
  assert 'Traceback' not in p.stderr
