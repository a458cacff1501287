"""The one trainer: mesh, sharded state, a jitted step with donated state and gradient
accumulation, the optimizer of train/optim.py, orbax checkpoints, evaluation.

Family-agnostic: everything model-specific comes through the hooks of `train.families.Family`;
evaluations are the evaluators `config.evals` lists (train/evals/: validation, robustness,
next-word accuracy, the family's `eval_suite`, ...), run in the loop, by `evaluate` and by the
evaluator job.
Hot path: `nnx.split` once; the step is a pure function of (state, batch) where state =
{'step', 'params' (pure dict), 'opt_state'}; metrics are fetched one step late so the host
never waits for the device.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from train import checkpoint as ckpt_lib
from train import config_lib, families, metrics as metrics_lib, optim, partitioning, record
from train import hooks, storage
from train import evals
from train.metrics import log0

log = logging.getLogger(__name__)


def _match_param_shardings(abstract_opt, abstract_params, param_sh, default):
  """Optimizer-state leaves that mirror a parameter (Adam's mu/nu) get its sharding."""
  by_path = {}
  for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                              jax.tree.leaves(param_sh)):
    by_path[tuple(str(k) for k in path)] = (leaf.shape, sh)
  def pick(path, leaf):
    keys = tuple(str(k) for k in path)
    for i in range(len(keys)):
      hit = by_path.get(keys[i:])
      if hit is not None and hit[0] == leaf.shape:
        return hit[1]
    return default
  return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def resolve_steps(cfg, family: families.Family):
  """(config, FLOPs of one optimizer step): the FLOPs count every position of every row,
  padding included, from the family's accounting; the config is `cfg` itself, or with
  `train.flops_budget > 0` or `train.eval_count > 0` a copy with the step counts resolved
  (`train.steps = budget // flops per step`; `train.eval_every = steps // eval_count`). `cfg` is
  never changed. The one place a FLOP budget becomes steps: `Setup` calls it, and `Setup.cfg`
  (what a run records in config.json) holds the result."""
  per_step = family.flops_per_token() * cfg.train.batch_size * cfg.data.seq_len
  if cfg.train.flops_budget <= 0 and cfg.train.eval_count <= 0:
    return cfg, per_step
  cfg = cfg.copy_and_resolve_references()
  if cfg.train.flops_budget > 0:
    cfg.train.steps = max(1, int(cfg.train.flops_budget // per_step))
  if cfg.train.eval_count > 0:
    cfg.train.eval_every = max(1, cfg.train.steps // cfg.train.eval_count)
  return cfg, per_step


GRADIENT_WRAPPER_ENV = 'NOTOKLM_GRADIENT_WRAPPER'


def installed_gradient_wrapper():
  """The function `$NOTOKLM_GRADIENT_WRAPPER` names ('package.module:function' or
  'path/to/file.py:function'), or None (production runs set nothing). It takes the train
  step's `gradients(state, batch, frozen) -> (loss, metric sums, gradients)` and returns one of
  the same signature, traced inside the jitted step before the non-finite check: the test
  suite's fault injection (tests/fault_injection.py) makes chosen steps non-finite this way, in
  the test process and in launch.py subprocesses alike."""
  return hooks.installed(GRADIENT_WRAPPER_ENV)


class Setup:
  """Everything derived from a config that train, eval and sample share."""

  def __init__(self, cfg, family: families.Family | None = None, workdir: str | None = None):
    """`family`: an already built family for `cfg` (benchmarks substitute synthetic data);
    default `families.get(cfg, workdir)` (`workdir`: the run whose recorded artifacts the
    family reads)."""
    config_lib.validate(cfg)
    self.family = families.get(cfg, workdir) if family is None else family
    # the config with train.steps / eval_every resolved (a copy when they change)
    self.cfg, self.flops_per_step = resolve_steps(cfg, self.family)
    cfg = self.cfg
    # the evaluators `config.evals` lists (an unknown type, or one for another family, is a
    # ConfigError now, before anything runs); the same objects serve every mode
    self.evaluators = evals.Evaluators(cfg, self.family.name)
    self.mesh = partitioning.make_mesh(cfg.mesh)
    self.tx, self.schedule = optim.make_optimizer(cfg.optim, cfg.train.steps)
    abstract_model = nnx.eval_shape(lambda: self.family.build_model(nnx.Rngs(cfg.seed)))
    # Trained state (`family.trainable()`, default every nnx.Param) vs frozen state: the frozen
    # part (e.g. a pretrained LM under a hypernetwork) comes from `family.frozen_params()`, is
    # an argument of the jitted steps (never a baked-in constant), and is not checkpointed.
    self.trainable = self.family.trainable()
    self.graphdef, abstract_vars, abstract_frozen = nnx.split(abstract_model, self.trainable,
                                                              ...)
    self.frozen = None
    if jax.tree.leaves(abstract_frozen):
      frozen = self.family.frozen_params()
      if frozen is None:
        raise TypeError(f'family {self.family.name!r}: the model holds state outside '
                        f'trainable() but frozen_params() returns None')
      frozen_sh = partitioning.param_shardings(abstract_frozen, self.mesh)
      self.frozen = jax.device_put(frozen, frozen_sh)
    self.param_sh = partitioning.param_shardings(abstract_vars, self.mesh)
    abstract_params = nnx.to_pure_dict(abstract_vars)
    repl = partitioning.replicated(self.mesh)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
    self.state_sh = {
        'step': repl, 'params': self.param_sh,
        'opt_state': _match_param_shardings(abstract_opt, abstract_params, self.param_sh, repl),
        'nonfinite': repl}
    self.n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))

  # -- state ---------------------------------------------------------------------------------
  def _init(self):
    model = self.family.build_model(nnx.Rngs(self.cfg.seed))
    params = nnx.to_pure_dict(nnx.state(model, self.trainable))
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': self.tx.init(params), 'nonfinite': jnp.zeros((), jnp.int32)}

  def init_state(self):
    initial = self.family.initial_params()
    if initial is not None:  # e.g. pretrained weights from a file
      params = jax.device_put(initial, self.param_sh)
      opt = jax.jit(self.tx.init, out_shardings=self.state_sh['opt_state'])(params)
      return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': opt,
              'nonfinite': jnp.zeros((), jnp.int32)}
    return jax.jit(self._init, out_shardings=self.state_sh)()

  def abstract_state(self):
    return ckpt_lib.abstract_like(jax.eval_shape(self._init), self.state_sh)

  def model(self, params, frozen=None):
    frozen = self.frozen if frozen is None else frozen
    if frozen is None:
      return nnx.merge(self.graphdef, params)
    return nnx.merge(self.graphdef, params, frozen)

  # -- steps ---------------------------------------------------------------------------------
  def _loss(self, params, batch, rng, frozen=None):
    return self.family.loss(self.model(params, frozen), batch, rng)

  def make_train_step(self):
    cfg, tx, accum = self.cfg, self.tx, self.cfg.train.grad_accum
    base_rng = jax.random.fold_in(jax.random.key(cfg.seed), 1)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)  # (params, batch, rng, frozen)
    batch_spec = partitioning.BATCH_AXES

    def gradients(state, batch, frozen):
      """(mean loss, metric sums, mean gradients) of one step's batch."""
      rng = jax.random.fold_in(base_rng, state['step'])
      params = state['params']
      if accum == 1:
        (loss, sums), grads = grad_fn(params, batch, rng, frozen)
        return loss, sums, grads
      def split(x):  # rows {a, a+A, ...} form micro-batch a: every device keeps its share
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(
                None, batch_spec, *([None] * (x.ndim - 2)))))
      micro = jax.tree.map(split, batch)
      def body(carry, inp):
        mb, i = inp
        (l, s), g = grad_fn(params, mb, jax.random.fold_in(rng, i), frozen)
        return jax.tree.map(jnp.add, carry, (l, s, g)), None
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng, frozen)))
      zeros = (zeros[0][0], zeros[0][1], zeros[1])
      (loss, sums, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
      return loss / accum, sums, jax.tree.map(lambda g: g / accum, grads)

    wrapper = installed_gradient_wrapper()
    if wrapper is not None:
      log0(f'the train step\'s gradients pass through {os.environ[GRADIENT_WRAPPER_ENV]} '
           f'(${GRADIENT_WRAPPER_ENV})')
      gradients = wrapper(gradients)

    def step_fn(state, batch, frozen):
      params = state['params']
      loss, sums, grads = gradients(state, batch, frozen)
      grad_norm = optax.tree.norm(grads)
      updates, opt_state = tx.update(grads, state['opt_state'], params)
      update_norm = optax.tree.norm(updates)
      # a non-finite loss, gradient or update (e.g. an overflowing learning rate) is never
      # applied; train.nan_policy decides whether the run stops or counts it and goes on
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
      new_params = optax.apply_updates(params, updates)
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_params = keep(new_params, params)
      opt_state = keep(opt_state, state['opt_state'])
      new_state = {'step': state['step'] + 1, 'params': new_params, 'opt_state': opt_state,
                   'nonfinite': state['nonfinite'] + (~finite).astype(jnp.int32)}
      out = dict(sums, loss_mean=loss, grad_norm=grad_norm, update_norm=update_norm,
                 lr=self.schedule(state['step']), finite=finite)
      return new_state, out

    step = jax.jit(step_fn, out_shardings=(self.state_sh, partitioning.replicated(self.mesh)),
                   donate_argnums=0)
    return lambda state, batch: step(state, batch, self.frozen)

  def make_eval_step(self):
    rng = jax.random.key(0)
    step = jax.jit(lambda params, batch, frozen: self._loss(params, batch, rng, frozen)[1],
                   out_shardings=partitioning.replicated(self.mesh))
    return lambda params, batch: step(params, batch, self.frozen)

  def evaluate(self, params, local_batches, eval_step=None) -> dict:
    eval_step = eval_step or self.make_eval_step()
    totals: dict[str, float] = {}
    for b in local_batches:
      sums = eval_step(params, partitioning.global_batch(b, self.mesh))
      for k, v in jax.device_get(sums).items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return metrics_lib.derived(totals, self.family.derived_metrics)


class _StopFlag:
  """Set by SIGTERM (preemption) and SIGINT (Ctrl-C): the loop checkpoints and returns at the
  next step. Later signals while stopping are ignored (the checkpoint is on its way)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = None
    self._prev = {}
    if threading.current_thread() is threading.main_thread():
      self._prev = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ''

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum

  def restore(self):
    for s, prev in self._prev.items():
      signal.signal(s, prev)
    self._prev = {}


def restore_or_init(setup: Setup, checkpointer: ckpt_lib.Checkpointer, step=None,
                    move_aside: bool = False):
  """-> (state, data_state or None, restored step or None). `move_aside`: the training process
  moves unreadable newer checkpoints out of its way (see train/checkpoint.py)."""
  if checkpointer.latest_step() is None:
    if step is not None:
      raise FileNotFoundError(f'no checkpoint in {checkpointer.directory}')
    return setup.init_state(), None, None
  s, state, data_state = checkpointer.restore(setup.abstract_state(), step=step,
                                              move_aside=move_aside)
  return state, data_state, s


def _resume_data(it, data_state: dict, cfg) -> None:
  """Continues the data iterator where the checkpoint left it, or says what changed."""
  try:
    it.set_state(data_state)
  except ValueError as e:
    raise ckpt_lib.CheckpointError(
        f'the training data changed since this run was checkpointed, so it cannot resume on '
        f'the exact next batch ({e}; data.source={cfg.data.source!r}). Restore the data the '
        'run was trained on, or start a new run in another --workdir.') from e


def _announce(setup: Setup) -> None:
  fam = setup.family
  log0(f'[{fam.name}] {fam.describe()} | params {setup.n_params / 1e6:.2f}M | '
       f'devices {jax.device_count()} (mesh {dict(setup.mesh.shape)}) x '
       f'{jax.process_count()} process(es) | backend {jax.default_backend()}')


def _lock(workdir: str):
  """The workdir's one-writer lock, taken by process 0; every process learns whether it got it
  (so a refused multi-host job ends on every host, not in a collective)."""
  lock = storage.WorkdirLock(workdir)
  error = ''
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except storage.WorkdirError as e:
      error = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flag = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    if flag and not error:
      error = f'workdir {workdir} is already being trained (refused on process 0)'
  if error:
    raise storage.WorkdirError(error)
  return lock


def train(cfg, workdir: str, allow_changes=()) -> dict:
  """Trains (resuming from the workdir's latest checkpoint), evaluates, samples. One training
  process per workdir (a lock); nothing is written before the config, the checkpoint and the
  data are known to fit together. A resume checks the config and the data against the run's
  record (train/record.py): `allow_changes` are the keys (and `data.fingerprint`) the user
  allows to change explicitly (`--allow_config_change`). A finished run with nothing to do
  writes nothing and returns its summary with `nothing_to_do`."""
  config_lib.validate(cfg)
  evals.Evaluators(cfg, cfg.family)  # config.evals is checked before the workdir is touched
  from train import preflight  # pylint: disable=import-outside-toplevel
  preflight.check(cfg)  # batch and mesh against the devices present, before any data or compile
  check_sample_early(cfg)  # the end-of-run sample's prompt, before the family is built
  created = not storage.is_remote(workdir) and not os.path.exists(storage.canonical(workdir))
  workdir = storage.check_workdir(workdir)  # scheme, bucket and credentials before anything
  lock = _lock(workdir)
  failed = True
  try:
    out = _train(cfg, workdir, lock, tuple(allow_changes))
    failed = False
    return out
  finally:
    lock.release()
    if failed and created and jax.process_index() == 0:
      _remove_unstarted(workdir)


# what a run writes in its workdir before its first step's metrics
_BEFORE_FIRST_STEP = {storage.WorkdirLock.NAME, 'checkpoints', 'config.json', 'artifacts', 'tb',
                      'metrics.jsonl', 'eval_metrics.jsonl', 'run.json', 'config_history.jsonl',
                      'train_time.jsonl'}


def _remove_unstarted(workdir: str) -> None:
  """A run that failed before its first step in a workdir it created itself leaves nothing
  behind (no directory holding only a lock file and an empty checkpoints/). Kept: anything
  with a checkpoint, a metrics line, or a file the run does not write before its first step."""
  if ckpt_lib.complete_steps(os.path.join(workdir, 'checkpoints')):
    return
  if not set(os.listdir(workdir)) <= _BEFORE_FIRST_STEP:
    return
  metrics = os.path.join(workdir, 'metrics.jsonl')
  if os.path.exists(metrics) and os.path.getsize(metrics):
    return
  storage.rmtree(workdir)
  log.warning('the run failed before its first step; removed the workdir it had created (%s)',
              workdir)


def check_sample_early(cfg) -> None:
  """The checks of `config.sample` that need no family built (`check_sample_config`, and for
  a family that samples, a prompt that is text): a bad prompt fails at once, not after an
  LCM's sentence embedding or a whole training run."""
  cls = families.family_class(cfg)
  cls.check_sample_config(cfg)
  if cls.sample is not families.Family.sample and not cfg.sample.get('byte_level', False):
    text_prompt(cfg.sample.prompt)


def text_prompt(prompt: str) -> str:
  """`sample.prompt` for plain (token-level) sampling, which encodes it as text: a ValueError
  naming the first byte that is not UTF-8 (bytes that are not UTF-8 on the command line
  reach the prompt as surrogate escapes)."""
  try:
    str(prompt).encode('utf-8')
    return prompt
  except UnicodeEncodeError:
    pass
  raw = str(prompt).encode('utf-8', 'surrogateescape')
  try:
    raw.decode('utf-8')
    at = ''
  except UnicodeDecodeError as e:
    at = f': byte {e.start} (0x{raw[e.start]:02x}) is not valid UTF-8'
  raise ValueError(f'sample.prompt {raw!r}{at}. Plain sampling encodes the prompt as text; '
                   'sample.byte_level=True samples from bytes through the byte-level view '
                   '(the byte LM and HAT continue any bytes)')


def _train(cfg, workdir: str, lock: storage.WorkdirLock, allow: tuple = ()) -> dict:
  setup = Setup(cfg, workdir=workdir)
  cfg = setup.cfg  # train.steps resolved from train.flops_budget: what config.json records
  fam = setup.family
  fam.check_sample(cfg.sample)  # what the end of the run needs, before any training
  if 0 < cfg.train.flops_budget < setup.flops_per_step:
    log.warning('train.flops_budget=%.3g is less than the FLOPs of one step (%.3g): the run '
                'trains 1 step, over the budget; raise the budget or lower train.batch_size / '
                'data.seq_len', cfg.train.flops_budget, setup.flops_per_step)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), cfg.ckpt.keep,
                                       cfg.ckpt.async_save)
  latest = checkpointer.latest_step()
  # a run with a checkpoint is resumed on what it recorded; without one, it starts anew
  saved = None if latest is None else record.saved_config(workdir)
  try:
    changes = [] if saved is None else record.check_resume(workdir, saved, cfg, allow)
  except BaseException:
    checkpointer.close()
    raise
  _announce(setup)
  pid, pcount = jax.process_index(), jax.process_count()
  it = fam.train_iterator(pid, pcount)
  try:
    state, data_state, restored = restore_or_init(setup, checkpointer, move_aside=True)
    # (the step restored: an unreadable newest checkpoint is not a finished run)
    done = None if saved is None else record.finished(workdir, restored, cfg.train.steps)
    if done is not None:
      log0(f'run finished at step {done["step"]} (train.steps={cfg.train.steps}); nothing to '
           f'do; extend with --config.train.steps=N (N > {done["step"]})')
      it.close()
      checkpointer.close()
      return {**done, 'nothing_to_do': True}
    if data_state is not None:
      _resume_data(it, data_state, cfg)
    from data import fingerprint  # pylint: disable=import-outside-toplevel
    data_fp = fingerprint.source(cfg.data)
    if restored is not None:
      changes += record.check_data(workdir, data_fp, allow)
    note = None if restored is None or not changes else optim.extension_note(saved, cfg, restored)
    if note is not None:  # what the resume does to the learning rate, said and recorded
      log0(f'resuming at step {restored}: {note["note"]}')
      changes.append(note)
  except BaseException:
    it.close()
    checkpointer.close()
    raise
  # the config, the checkpoint and the data agree: only now is anything written
  if pid == 0:
    if saved is None or changes:
      config_lib.save(cfg, workdir)
    record.append_history(workdir, restored or 0, changes)
  if restored is None:
    families.write_artifacts(fam, workdir)
  else:
    log0(f'resumed from step {restored} ({checkpointer.directory})'
         + ''.join(f'; {c["key"]}: {c["old"]!r} -> {c["new"]!r}' for c in changes))
  if pid == 0:
    record.write_run(workdir, cfg, data_fp, restored or 0,  # the run's identity, once
                     new=restored is None)
  seconds_before = record.train_seconds_at(workdir, restored)
  writer = metrics_lib.Writer(workdir, resume_step=restored or 0)
  notes = setup.evaluators.prepare(setup, setup.evaluators.in_loop())  # e.g. the eval batches
  counted = {k: v for k, v in fam.data_stats().items() if v and ('skipped' in k or 'cut' in k
                                                                 or 'without' in k)}
  log0('data: ' + (', '.join(notes) or 'no evaluation in the loop')
       + (' | counted and skipped/cut: ' + ', '.join(f'{k}={v}' for k, v in
                                                     sorted(counted.items())) if counted else ''))
  train_step = setup.make_train_step()
  cfg_dict = cfg.to_dict()

  step = int(jax.device_get(state['step']))
  total = cfg.train.steps
  progress = metrics_lib.Progress(step, total, fam.flops_per_token())
  stop = _StopFlag()
  pending = None
  last_saved = restored
  window: dict[str, float] = {}
  headline = fam.headline_metrics()  # the family's own metrics beside loss and bpb
  result = {}

  def save(s, force=False):
    nonlocal last_saved, pending
    if last_saved != s:
      lock.check()  # a bucket lease taken over by another run: stop before writing
      checkpointer.save(s, state, it.get_state(), cfg_dict, force=force)
      if pid == 0:  # the training time up to this checkpoint, accumulated across resumes
        record.log_train_time(workdir, s, seconds_before + time.perf_counter() - t_start)
      if pending is not None and pending[0] <= s:  # step s's own metrics line, written one
        p, pending = pending, None                 # step late otherwise: a run killed right
        flush(p)                                   # after this save would resume without it
      writer.flush()  # the logs are durable up to every checkpoint (a bucket: one upload)
      last_saved = s

  def flush(p):
    s, m = p
    m = jax.device_get(m)
    finite = bool(m.pop('finite'))
    d = metrics_lib.derived(m, fam.derived_metrics)
    d['loss'] = float(m['loss_mean'])
    d.pop('loss_mean', None)
    if not finite:
      if cfg.train.nan_policy == 'stop':
        raise FloatingPointError(
            f'non-finite loss, gradient or update at step {s} (loss {d["loss"]}, grad_norm '
            f'{d["grad_norm"]}, update_norm {d["update_norm"]}); the update was not applied; '
            f'last checkpoint: step {last_saved}')
      log.warning('non-finite loss/gradient/update at step %d: update skipped (nan_policy=skip)',
                  s)
    progress.add(d.get('n_tokens', 0.0), d.get('n_bytes', 0.0))
    writer.scalars(s, {k: d[k] for k in ('loss', 'bpb', *headline, 'grad_norm', 'lr', 'n_bytes')
                       if k in d}, jsonl='metrics.jsonl')
    for k in ('loss', 'bpb', 'grad_norm', 'lr'):
      if k in d:
        window[k] = d[k]
    if s % cfg.train.log_every == 0 or s == total:
      r = progress.rates(s)
      writer.scalars(s, r, prefix='perf')
      log0(progress.line(s, window, r))
    result.update(window)

  t_start = time.perf_counter()
  try:
    while step < total:
      batch = partitioning.global_batch(next(it), setup.mesh)
      state, m = train_step(state, batch)
      step += 1
      if pending is not None:
        flush(pending)
      pending = (step, m)
      if step % cfg.ckpt.every == 0 or step == total or stop.requested:
        save(step)
      due = setup.evaluators.due(step, cfg.train.eval_every) if step < total else []
      if due:
        ev = run_evaluators(setup, due, state['params'], workdir, step, writer)
        if evals.ran(due, 'validation'):
          log0(f'eval step {step}: loss {ev.get("loss", float("nan")):.4f}'
               + (f' bpb {ev["bpb"]:.4f}' if 'bpb' in ev else '')
               + ''.join(f' {label} {ev[k]:.4f}' for k, label in headline.items() if k in ev))
      if stop.requested:
        break
    if pending is not None:
      flush(pending)
  except BaseException:
    stop.restore()
    _close(checkpointer, writer, it)
    raise
  stop.restore()
  writer.flush()
  checkpointer.wait()
  train_time = seconds_before + time.perf_counter() - t_start
  reads = fam.data_reads()
  if reads:  # each process: the objects of a streamed corpus it read in this launch
    record.append_reads(workdir, pid, {'from_step': restored or 0, 'to_step': step,
                                       'process_count': jax.process_count(), 'sources': reads})

  if stop.requested and step < total:
    log0(f'stopped by {stop.name} at step {step}; checkpoint of step {last_saved} saved')
    _close(checkpointer, writer, it)
    return {'preempted_at': step, 'signal': stop.name}

  due = setup.evaluators.due(step, cfg.train.eval_every, last=True)
  ev = run_evaluators(setup, due, state['params'], workdir, step, writer)
  if evals.ran(due, 'validation'):
    log0(f'validation at step {step}: loss {ev.get("loss", float("nan")):.4f}'
         + (f' | bits per byte {ev["bpb"]:.4f}' if 'bpb' in ev else '')
         + ''.join(f' | {label} {ev[k]:.4f}' for k, label in headline.items() if k in ev))
  nonfinite = int(jax.device_get(state['nonfinite']))
  summary = {'step': step, 'train': result, 'eval': ev, 'train_seconds': train_time,
             'flops_per_step': setup.flops_per_step, 'train_flops': setup.flops_per_step * step,
             'params': setup.n_params,
             'nonfinite_steps': nonfinite, 'data': fam.data_stats()}
  summary_path = os.path.join(workdir, 'train_summary.json')
  if pid == 0:  # the run's record, before any extra that could fail
    storage.write_json(summary_path, summary)
  try:
    samples = fam.sample(setup.model(state['params']), cfg.sample)
  except Exception as e:  # pylint: disable=broad-except  # an extra: the run stays recorded
    log.warning('sampling after training failed (the run is complete and recorded in %s): '
                '%s: %s', summary_path, type(e).__name__, e)
    summary['sample_error'] = f'{type(e).__name__}: {e}'
    samples = []
    if pid == 0:
      storage.write_json(summary_path, summary)
  for i, s in enumerate(samples[:1]):
    log0(f'sample {i} (prompt {cfg.sample.prompt!r}):\n{s}')
    writer.text(step, 'sample', s)
  _close(checkpointer, writer, it)
  return summary


def run_evaluators(setup: Setup, which: list, params, workdir: str, step: int,
                   writer: metrics_lib.Writer | None = None, jsonl: str = 'eval_metrics.jsonl'
                   ) -> dict:
  """Runs the evaluators `which` (of `setup.evaluators`) at `step`; their numbers go to
  TensorBoard under `eval/` and, with `jsonl`, to that file: the training loop's and the
  evaluator job's records, under the same keys (`evals.scalars`)."""
  if not which:
    return {}
  ev = setup.evaluators.run(which, setup, params, workdir, step)
  if writer is not None:
    writer.scalars(step, evals.scalars(ev), prefix='eval', jsonl=jsonl)
  return ev


def _close(checkpointer, writer, it):
  checkpointer.close()
  writer.close()
  it.close()


def restore(cfg, workdir: str, step: int | None = None, family: families.Family | None = None):
  """(setup, state, step) of the latest (or `step`) checkpoint, restored onto this process's
  mesh, whatever the device count of the run that wrote it. Reads only: a workdir without
  checkpoints is an error, except for a family with its own weights (`has_own_weights`), which
  then uses them."""
  workdir = storage.canonical(workdir)
  if storage.is_remote(workdir):
    storage.check_workdir(workdir)  # the scheme, the bucket and the credentials
  elif os.path.exists(workdir) and not os.path.isdir(workdir):
    raise storage.WorkdirError(f'workdir {workdir} is a file, not a directory')
  setup = Setup(cfg, family, workdir)
  ckpt_dir = storage.join(workdir, 'checkpoints')
  if not ckpt_lib.complete_steps(ckpt_dir):
    if step is None and setup.family.has_own_weights():
      log0(f'no checkpoint in {ckpt_dir}: using the pretrained weights')
      return setup, setup.init_state(), 0
    what = ('does not exist' if not storage.exists(workdir)
            else 'has no checkpoints (was it trained?)')
    raise FileNotFoundError(f'workdir {workdir} {what}')
  checkpointer = ckpt_lib.Checkpointer(ckpt_dir, cfg.ckpt.keep, async_save=False,
                                       read_only=True)
  try:
    if (step is None and checkpointer.latest_step() is None
        and setup.family.has_own_weights()):
      log0(f'no checkpoint in {ckpt_dir}: using the pretrained weights')
      return setup, setup.init_state(), 0
    state, _, s = restore_or_init(setup, checkpointer, step=step)
    if s is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt_dir}')
  finally:
    checkpointer.close()
  return setup, state, s


def evaluate(cfg, workdir: str, step: int | None = None) -> dict:
  """Restores the latest (or `step`) checkpoint onto this process's mesh and runs every
  evaluator `config.evals` lists (by default validation loss / bits per byte, the robustness
  suite (`eval.robustness`), next-word accuracy (`eval.next_word`, every family with a
  byte-level view) and the family's own `eval_suite`); writes `eval_step{N}.json`."""
  setup, state, s = restore(cfg, workdir, step)
  workdir = storage.check_workdir(workdir)  # results go there (a pretrained model's may be new)
  try:
    ev = run_evaluators(setup, setup.evaluators.all, state['params'], workdir, s)
  except KeyboardInterrupt:
    raise KeyboardInterrupt(
        f'the evaluation of step {s} was interrupted before every evaluator finished: '
        f'nothing was written ({storage.join(workdir, f"eval_step{s}.json")} holds only whole '
        'evaluations); rerun --mode=eval') from None
  ev['step'] = s
  if evals.ran(setup.evaluators.all, 'validation'):
    log0(f'eval of step {s}: loss {ev.get("loss", float("nan")):.4f}'
         + (f' | bits per byte {ev["bpb"]:.4f}' if 'bpb' in ev else '')
         + f' ({int(ev.get("n_tokens", 0))} tokens, {int(ev.get("n_bytes", 0))} bytes)')
  if jax.process_index() == 0:  # which data, batches and overrides; never over a larger one
    ev['record'] = record.eval_record(workdir, setup.cfg)
    path = record.write_eval(workdir, s, ev)
    if not path.endswith(f'eval_step{s}.json'):
      log0(f'written to {path} (eval_step{s}.json holds a larger evaluation of the run\'s own '
           'data, or this one is of other data)')
  return ev


def sample(cfg, workdir: str, step: int | None = None) -> list[str]:
  """`--mode=sample`: the family's own sampling, or with `sample.byte_level` byte-level
  sampling through its byte view (`sample_bytes`)."""
  byte_level = bool(cfg.sample.byte_level)
  if byte_level:
    prompt_bytes(cfg.sample.prompt)  # bad prompts fail before anything is restored
  else:
    check_sample_early(cfg)
  setup, state, s = restore(cfg, workdir, step)
  if byte_level:
    return sample_bytes(setup.family, setup.model(state['params']), cfg.sample, s)
  setup.family.check_sample(cfg.sample)
  out = setup.family.sample(setup.model(state['params']), cfg.sample)
  for i, text in enumerate(out):
    log0(f'--- sample {i} (step {s}, prompt {cfg.sample.prompt!r}, temperature '
         f'{cfg.sample.temperature}, top_p {cfg.sample.top_p})\n{text}')
  return out


def prompt_bytes(prompt: str) -> bytes:
  """`sample.prompt` as bytes for byte-level sampling: UTF-8, and bytes that are not UTF-8 on
  the command line (bash: --config.sample.prompt=$'caf\\xc3') come back as those bytes
  (Python keeps them as surrogate escapes). An empty prompt is a ValueError."""
  try:
    out = str(prompt).encode('utf-8', 'surrogateescape')
  except UnicodeEncodeError as e:
    raise ValueError(f'sample.prompt={prompt!r}: not text or bytes ({e.reason})') from None
  if not out:
    raise ValueError('sample.prompt is empty: byte-level sampling (sample.byte_level=True) '
                     "continues a prompt; give one, e.g. --config.sample.prompt='def fibonac'")
  return out


def sample_bytes(family: families.Family, model, cfg_sample, step: int = 0) -> list[str]:
  """Byte-level sampling of `cfg_sample.prompt` through `family.byte_view(model)`, at most
  `sample.max_new_tokens` BYTES; for a BPE model also plain token-level decoding and token
  healing, side by side (models.byte_level.sample_compare). Logs and returns prompt +
  completion for each (bytes that are not UTF-8 shown as \\x escapes)."""
  from models import byte_level  # pylint: disable=import-outside-toplevel
  prompt = prompt_bytes(cfg_sample.prompt)
  view = family.byte_view(model)
  n = int(cfg_sample.max_new_tokens)
  outs = byte_level.sample_compare(view, prompt, n, cfg_sample.temperature, cfg_sample.top_p,
                                   cfg_sample.seed)
  how = ('greedy' if cfg_sample.temperature == 0 else
         f'temperature {cfg_sample.temperature}, top_p {cfg_sample.top_p}, seed {cfg_sample.seed}')
  log0(f'--- byte-level sampling (step {step}, family {family.name}, {type(view).__name__} '
       f'view; prompt {prompt!r}, {len(prompt)} bytes; {how}; at most {n} bytes)')
  width = max(len(k) for k in outs)
  texts = []
  for name, out in outs.items():
    if isinstance(out, bytes):  # prompt + completion: a character may span the boundary
      texts.append((prompt + out).decode('utf-8', 'backslashreplace'))
      log0(f'{name:<{width}}  {texts[-1]!r}')
    else:
      log0(f'{name:<{width}}  ({out})')
  return texts


def export_hf(cfg, workdir: str, step: int | None = None, out_dir: str = '') -> str:
  """Writes the latest (or `step`) checkpoint as an HF-format directory through the family's
  `export_hf` (token LMs: config.json, model.safetensors with float32 parameters only,
  tokenizer.json; transformers loads it, and so does `--config=configs/pretrained.py
  --config.model.source=DIR` for evaluation)."""
  setup, state, s = restore(cfg, workdir, step)
  out_dir = out_dir or storage.join(storage.canonical(workdir), 'export', f'hf_step{s}')
  new = [] if storage.is_remote(out_dir) else _missing_dirs(out_dir)
  try:
    with storage.local_dir(out_dir) as local:  # a bucket: written locally, then uploaded
      setup.family.export_hf(setup.model(state['params']), local)
  except BaseException:
    for d in new:  # a failed export leaves no directory it created (e.g. an empty hf_stepN/)
      shutil.rmtree(d, ignore_errors=True)
    raise
  log0(f'exported step {s} to {out_dir}')
  return out_dir


def _missing_dirs(path: str) -> list[str]:
  """`path` and its parents that do not exist yet, innermost first."""
  out, p = [], os.path.abspath(path)
  while p and not os.path.exists(p):
    out.append(p)
    p = os.path.dirname(p)
  return out
