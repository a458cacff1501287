"""The tests' launch server (tests/launch_server.py) against plain `python launch.py`: the
same exit status, stdout and stderr for a run that ends in a user's error, for --help, and for
a run killed by a signal; the run gets its own environment; two runs may overlap."""
import os
import signal
import subprocess

from conftest import ROOT, LaunchProc, launch_cmd, run_launch, start_launch, subprocess_env


def _plain(data_dir, *args, **env):
  return subprocess.run(launch_cmd(*args), cwd=ROOT, env=subprocess_env(data_dir, **env),
                        capture_output=True, text=True, timeout=120)


def test_same_as_a_plain_subprocess(data_dir, tmp_path):
  cases = [('--help',),  # exit 0, stdout only
           ('--config=configs/byte_lm.py:tiny', f'--workdir={tmp_path}/a',
            '--config.optim.lrr=1'),  # a user's error: exit 2, one line on stderr
           ('--config=configs/byte_lm.py:tiny', '--workdir=')]  # exit 2 from the parser
  for args in cases:
    served = run_launch(data_dir, *args, check=False)
    plain = _plain(data_dir, *args)
    assert (served.returncode, served.stdout, served.stderr) == (
        plain.returncode, plain.stdout, plain.stderr), args
  assert run_launch(data_dir, *cases[1], check=False).returncode == 2


def test_environment_signals_and_overlapping_runs(data_dir, tmp_path):
  # the run's own environment: a variable the server never had reaches the run
  # (the test hook names a module that does not exist: the run says so and fails)
  p = run_launch(data_dir, '--config=configs/byte_lm.py:tiny', f'--workdir={tmp_path}/h',
                 '--config.train.steps=1', check=False,
                 NOTOKLM_GRADIENT_WRAPPER='/nonexistent/hook.py:wrap')
  assert p.returncode != 0 and '/nonexistent/hook.py' in p.stdout + p.stderr
  # two runs at once, one killed by a signal (subprocess's negative status), stderr merged
  # into stdout in order
  procs = [start_launch(data_dir, '--help') for _ in range(2)]
  served = os.environ.get('NOTOKLM_TEST_LAUNCH_SERVER', '1') != '0'
  assert all(isinstance(q, LaunchProc) for q in procs) == served  # off: plain subprocesses
  slow = start_launch(data_dir, '--config=configs/byte_lm.py:tiny', f'--workdir={tmp_path}/s',
                      '--config.train.steps=100000')
  slow.send_signal(signal.SIGKILL)
  assert slow.wait(timeout=60) == -signal.SIGKILL
  for q in procs:
    out, err = q.communicate(timeout=60)
    assert q.returncode == 0 and err is None and out.startswith('usage: launch.py')
