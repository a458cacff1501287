"""Standard benchmarks through EleutherAI's lm-evaluation-harness (`lm-eval`, its core: no torch):
an `lm_eval.api.model.LM` over any text model of this codebase (`NotokLM`), the task checks that
turn a user's mistake into one message, one evaluation run (`evaluate`: results JSON + Markdown
table), and the evaluator type `lm_eval` (`config.evals`) that runs the listed tasks in the
training loop and in `--mode=evaluator`.

The harness owns the tasks: its registry (plus the YAML folder `lm_eval.include_path`), prompts,
few-shot sampling, metrics and aggregation are used as they are. This module only answers its
three request types:

  * loglikelihood(context, continuation) -> (log p, is_greedy).
    - Token LMs (subword LM, pretrained / transferred BPE models) with `scoring='tokens'`: lm-eval's
      HF conventions (`TemplateLM`): trailing spaces of the context move to the continuation,
      the whole string is encoded and then split at the context's token count, an empty context
      is the prefix token; the input is truncated on the left to the window (`max_length`
      tokens); is_greedy: every continuation token is the argmax. Requests are sorted by length
      and scored in batches of `batch_size` rows padded to a few lengths (powers of two from 16
      up to the window: one compilation per length), jitted, the rows spread over the mesh.
    - Byte-level families (byte LM, HAT, lexinvariant), and token LMs with `scoring='bytes'`:
      through the family's byte view (`Family.byte_view`, models/byte_level/): log p(continuation
      bytes | context bytes) from the view's next-byte distributions over context + continuation
      (exact for BPE: the marginal over canonical encodings), is_greedy: every byte is the argmax.
      No token boundary is involved, so the answer does not depend on where a tokenizer would
      split the context from the continuation. Batched across requests by the view
      (`ByteLM.loglikelihoods`: the byte LM's padded rows, the exact BPE view's lattice trees
      packed into a few shapes).
  * loglikelihood_rolling(text): lm-eval's disjoint windows with context
    (`utils.get_rolling_token_windows`, `make_disjoint_window`) over tokens, or over bytes for
    the byte path (one window when `max_bytes` is 0): word / byte perplexity, bits per byte.
  * generate_until(context, {until, max_gen_toks, do_sample, temperature}): greedy unless the
    task samples; the token path decodes tokens with the model's cached forward
    (`byte_level.token_generate`), the byte path bytes through the view (max_gen_toks counts
    bytes there); the text is cut at the first `until` string.

Several processes (jax.distributed): lm-eval runs in each with the whole task. The token path's
rows are sharded over the mesh that spans them and the scores gathered (`_fetch`); the byte path
and generation, driven from the host, run on each process's share of the requests on a copy of
the weights on its own device (`process_local`, `share`), the results gathered in order. A
process whose work raises does not leave the others waiting in a collective: every process
learns it in the next exchange (`share`'s gather, or `agreed` before the token path's fetches)
and all raise one `ProcessFailure` naming the failed process, what it was scoring and why.
"""
from __future__ import annotations

import difflib
import functools
import importlib.metadata
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data import encoders
from models import byte_level, token_lm
from train import evals, hooks, storage
from train.metrics import log0

SCORINGS = ('tokens', 'bytes')
MIN_LEN = 16  # the shortest padded length of a token batch


def _lm_eval():
  """The harness, imported offline: this codebase's machines have no hub, and a task whose data
  is not local must fail with a message rather than wait on the network."""
  os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
  os.environ.setdefault('HF_HUB_OFFLINE', '1')
  import lm_eval  # pylint: disable=import-outside-toplevel
  import lm_eval.api.model  # pylint: disable=import-outside-toplevel
  import lm_eval.tasks  # pylint: disable=import-outside-toplevel
  import lm_eval.utils  # pylint: disable=import-outside-toplevel
  return lm_eval


# -- batched token scoring ---------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _score_rows(graphdef, state, ids_BxT, targets_BxT, mask_BxT):
  """Sum of the target log-probs where mask is set, and whether each was the argmax, per row."""
  model = nnx.merge(graphdef, state)
  b, t = ids_BxT.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  logits, _ = model(ids_BxT, positions, jnp.ones_like(ids_BxT))
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets_BxT
  m = mask_BxT.astype(bool)
  return (jnp.sum(jnp.where(m, target - lse, 0.0), axis=-1),
          jnp.all(greedy | ~m, axis=-1))


class Compiles:
  """The XLA programs this process builds inside a `with Compiles() as c:` block, by name
  (`c.names`, in order; `c.model`: those of the scoring forwards, `MODEL`). Read from jax's
  backend-compile event, which fires for each program built, whether XLA compiled it or the
  persistent compilation cache had it; a program this process already built is not built again,
  so the count is of the distinct programs the block needed beyond those."""

  MODEL = ('jit(_score_rows)', 'jit(_forward)', 'jit(_forward_tree)')
  EVENT = '/jax/core/compile/backend_compile_duration'

  def __init__(self):
    self.names: list[str] = []

  def _listen(self, event, duration, **kwargs):  # pylint: disable=unused-argument
    if event == self.EVENT:
      self.names.append(str(kwargs.get('fun_name', '?')))

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)

  @property
  def model(self) -> list[str]:
    return [n for n in self.names if n in self.MODEL]


def _fetch(x) -> np.ndarray:
  """A jitted result on the host. Rows sharded over a mesh that spans several processes: each
  process scored its share, gathered here from all of them."""
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def padded_length(n: int, window: int) -> int:
  """The padded length of a row of `n` tokens: a power of two >= MIN_LEN, at most the window."""
  return min(max(MIN_LEN, 1 << max(0, n - 1).bit_length()), max(window, n))


class TokenScorer:
  """(context ids, continuation ids) pairs -> (log p, is_greedy), batched in a few padded shapes
  (see the module doc). `compilations`: the distinct (batch, length) shapes run so far."""

  def __init__(self, model, window: int, batch_size: int, mesh=None):
    self.graphdef, self.state = nnx.split(model)
    self.window, self.mesh = int(window), mesh
    n = mesh.devices.size if mesh is not None else 1
    self.batch = max(1, -(-int(batch_size) // n) * n)  # a multiple of the devices
    self.shapes: set = set()

  def _place(self, x):
    if self.mesh is None or self.mesh.devices.size == 1:
      return jnp.asarray(x)
    spec = jax.sharding.PartitionSpec(tuple(self.mesh.axis_names))
    return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, spec))

  def __call__(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    launched = agreed(pairs, self._launch, 'token-level rows')
    out: list = [None] * len(pairs)
    for chunk, lp, greedy in launched:
      lp, greedy = _fetch(lp), _fetch(greedy)
      for r, i in enumerate(chunk):
        out[i] = (float(lp[r]), bool(greedy[r]))
    return out

  def _launch(self, pairs: list[tuple[list[int], list[int]]]) -> list:
    """The batches of `pairs` dispatched: [(their indices, log p, is_greedy)], not fetched (a
    fetch of rows that span processes is a collective: every process reaches it, or none)."""
    rows = []  # (input ids, number of continuation tokens scored at its end)
    for ctx, cont in pairs:
      if not cont:
        raise ValueError('an empty continuation: nothing to score')
      whole = (list(ctx) + list(cont))[-(self.window + 1):]
      rows.append((whole, min(len(cont), len(whole) - 1)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = []
    for s in range(0, len(order), self.batch):
      chunk = order[s:s + self.batch]
      t = padded_length(max(len(rows[i][0]) - 1 for i in chunk), self.window)
      ids = np.zeros((self.batch, t), np.int32)
      tgt = np.zeros((self.batch, t), np.int32)
      mask = np.zeros((self.batch, t), np.int32)
      for r, i in enumerate(chunk):
        whole, k = rows[i]
        n = len(whole) - 1
        ids[r, :n], tgt[r, :n] = whole[:-1], whole[1:]
        mask[r, n - k:n] = 1
      self.shapes.add((self.batch, t))
      lp, greedy = _score_rows(self.graphdef, self.state, self._place(ids), self._place(tgt),
                               self._place(mask))
      out.append((chunk, lp, greedy))
    return out


# -- several processes ---------------------------------------------------------------------------
def process_local(model):
  """`model` as this process alone can run it: itself on one process; where the mesh spans
  several, a copy of its weights on this process's first device (gathered where they are
  sharded across processes), so that host-driven scoring (byte views, decoding) runs on each
  process's own share of the requests (`share`)."""
  if jax.process_count() == 1:
    return model
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  graphdef, state = nnx.split(model)
  dev = jax.local_devices()[0]

  def local(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_replicated:
      return jax.device_put(x.addressable_data(0), dev)
    return jax.device_put(np.asarray(multihost_utils.process_allgather(x, tiled=True)), dev)

  return nnx.merge(graphdef, jax.tree.map(local, state))


def _allgather_json(obj) -> list:
  """[obj of process 0, obj of process 1, ...] (JSON values) on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int32)))
  sizes = sizes.reshape(-1)
  buf = np.zeros(max(1, int(sizes.max())), np.uint8)
  buf[:len(data)] = data
  got = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(sizes), -1)
  return [json.loads(bytes(got[i, :int(sizes[i])]).decode()) for i in range(len(sizes))]


WRAPPER_ENV = 'NOTOKLM_LM_EVAL_WRAPPER'


def installed_wrapper():
  """The function `$NOTOKLM_LM_EVAL_WRAPPER` names ('package.module:function' or
  'path/to/file.py:function'), or None (production runs set nothing). It is given each
  process's work on its requests, `score(items) -> results`, and what that work is (e.g.
  'byte-level loglikelihood requests'), and returns a function of the same signature: the test
  suite (tests/lm_eval_faults.py) makes one process fail, or records each process's scores,
  this way, in launch.py subprocesses too."""
  return hooks.installed(WRAPPER_ENV)


class ProcessFailure(RuntimeError):
  """One or more processes failed on their share of the requests: raised on every process at
  the same point (none is left waiting in a collective for one that has stopped)."""


def _work(items: list, score, what: str):
  """`score(items)` through the installed wrapper (`installed_wrapper`): (its result, None), or
  (None, the exception) where it raised on this process."""
  wrapper = installed_wrapper()
  if wrapper is not None:
    score = wrapper(score, what)
  try:
    return score(items), None
  except Exception as e:  # pylint: disable=broad-except
    return None, e


def _raise_failures(parts: list[dict], what: str, n_items: int, error, shared: bool) -> None:
  """A `ProcessFailure` (on every process: `parts` is the same on all) naming each process whose
  part is {'error': message}; `error`: this process's own exception (the cause), if any;
  `shared`: each process had its share of the `n_items` items (else all of them)."""
  failed = [(p, part['error']) for p, part in enumerate(parts) if 'error' in part]
  if not failed:
    return
  n, rank = len(parts), jax.process_index()

  def items(p):
    return (f'its share of {what} ({len(range(p, n_items, n))} of {n_items})' if shared else
            f'{what} ({n_items})')

  raise ProcessFailure('lm_eval: ' + '; '.join(
      f'process {p} of {n} failed on {items(p)}: {msg}' for p, msg in failed) +
      ('' if error is not None else f' (process {rank} stops too)')) from error


def _message(e: BaseException) -> str:
  return f'{type(e).__name__}: {str(e).strip()[:2000] or "(no message)"}'


def agreed(items: list, score, what: str):
  """`score(items)`, run on every process (the token path: the same items everywhere); where
  there are several processes, all of them learn in one exchange whether any failed before
  going on to collectives, and then all raise the same `ProcessFailure` (see `share`)."""
  got, error = _work(items, score, what)
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return got
  _raise_failures(_allgather_json({'error': _message(error)} if error else {}), what,
                  len(items), error, shared=False)
  return got


def share(items: list, score, what: str = 'requests') -> list:
  """`score(items)` (a list of JSON values, one per item). With several processes each scores
  its share, items[rank::processes], and the results are gathered in the items' order on every
  process (lm-eval runs in each of them with the whole task; process 0 writes the results).
  A process whose scoring raises sends its error instead, in the same gather: every process then
  raises one `ProcessFailure` naming the failed processes, `what` they were scoring and why
  (rather than waiting for a process that has stopped)."""
  n, rank = jax.process_count(), jax.process_index()
  if not items:  # the same items in every process: all of them skip together
    return []
  if n == 1:
    got, error = _work(items, score, what)
    if error is not None:
      raise error
    return list(got)
  mine = items[rank::n]
  got, error = _work(mine, score, what) if mine else ([], None)
  parts = _allgather_json({'error': _message(error)} if error else {'out': list(got)})
  _raise_failures(parts, what, len(items), error, shared=True)
  out: list = [None] * len(items)
  for p, part in enumerate(parts):
    out[p::n] = part['out']
  return out


# -- byte-level scoring ----------------------------------------------------------------------------
def _cut_left(b: bytes, max_bytes: int) -> bytes:
  """The last `max_bytes` bytes of `b` (0: all), starting at a UTF-8 character boundary."""
  if max_bytes <= 0 or len(b) <= max_bytes:
    return b
  i = len(b) - max_bytes
  while i < len(b) and 0x80 <= b[i] <= 0xBF:
    i += 1
  return b[i:]


def byte_loglikelihood(view, context: bytes, continuation: bytes) -> tuple[float, bool]:
  """log p(continuation | context) over bytes through a byte view, and whether every byte of
  the continuation is the most probable next byte (the document starts before `context`)."""
  return view.loglikelihoods([(bytes(context), bytes(continuation))])[0]


def canonical_log_z(view, text: bytes) -> tuple[list[int], np.ndarray]:
  """The canonical correction of a BPE model's byte view (`ExactBPE`) along the tokenizer's
  encoding of `text`: (ids = enc(text), log Z [len(ids) + 1]), where
  Z_k = sum of P(v | bos, ids[:k]) over the canonical next tokens v (plus P(end) where ids[:k]
  is the encoding of its own text), so that the canonical process gives the encoding
  log Q(ids) = log P(ids | bos) - sum(log Z[:len(ids)]) (and its end, minus log Z[len(ids)]).

  Byte-level and token-level scores of a continuation whose split falls on a token boundary
  (enc(context + continuation) = enc(context) + enc(continuation)) then differ exactly by
      log p_bytes(cont | ctx) = log P(enc(cont) | enc(ctx)) - sum of log Z over cont's steps
                                + log C(ctx + cont) - log C(ctx),
  C(x) = Q(text starts with x) / Q(enc(x)) >= 1: the mass of the other canonical sequences
  that cover x (their last token crosses its end); C(x) = 1 when no token of the vocabulary
  can cross x's end, and the C(ctx + cont) term drops when the document ends there."""
  c = view.c
  ids = c.encode(bytes(text))
  lp, _ = view._prefill(ids, len(ids) + 2)  # pylint: disable=protected-access
  lp = np.asarray(lp, np.float64)
  out, pos = [], 0
  for k in range(len(ids) + 1):
    tail = c.make_tail(bytes(text), pos, reversed(ids[:k]))
    row = c.row(tail)[:lp.shape[1]]
    terms = lp[k][np.flatnonzero(row)]
    if k == 0 or c.is_exact(tail):  # the text may end here
      terms = np.append(terms, lp[k][view.eos_id])
    m = terms.max()
    out.append(float(m + np.log(np.exp(terms - m).sum())))
    if k < len(ids):
      pos += int(c.lengths[ids[k]])
  return ids, np.asarray(out)


# -- the LM --------------------------------------------------------------------------------------
def make_lm(family, model, lm_cfg, window: int = 0, mesh=None, name: str = ''):
  """`NotokLM` over `model` of `family` with the options of `config.lm_eval` (`lm_cfg`)."""
  lm_eval = _lm_eval()

  class NotokLM(lm_eval.api.model.TemplateLM):
    """An `lm_eval.api.model.LM` over a model of any text family (see the module doc)."""

    def __init__(self):
      super().__init__()
      self.family, self.model, self.name = family, model, name or family.name
      self.local_model = process_local(model)  # what the byte view and decoding run on
      self.scoring = str(lm_cfg.scoring)
      self.add_bos = bool(lm_cfg.add_bos)
      self.max_bytes = int(lm_cfg.max_bytes)
      enc = getattr(family, 'encoder', None)
      self.encoder = enc
      # the token path: a token LM over a BPE encoder (a byte LM is byte-level already)
      self.token_path = (self.scoring == 'tokens' and isinstance(model, token_lm.TokenLM)
                         and isinstance(enc, encoders.BPEEncoder))
      self._view = None
      if self.token_path:
        self.window = int(lm_cfg.max_length) or int(window)
        self.scorer = TokenScorer(model, self.window, int(lm_cfg.batch_size), mesh)
        self._fn = None
      self.stats = {'requests': 0, 'seconds': 0.0}

    # what lm-eval reads
    @property
    def eot_token_id(self):
      return self.encoder.eos_id

    @property
    def prefix_token_id(self):
      return self.encoder.bos_id if self.add_bos else self.encoder.eos_id

    @property
    def max_length(self):
      return self.window

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
      ids = [int(i) for i in self.encoder.encode(string)]
      if self.add_bos and add_special_tokens is not False:
        ids = [self.encoder.bos_id] + ids
      return ids

    def tok_decode(self, ids):
      return self.encoder.decode(np.asarray(ids, np.int32))

    @property
    def view(self):
      if self._view is None:
        self._view = self.family.byte_view(self.local_model)
      return self._view

    @property
    def describe(self) -> str:
      return ('token-level (lm-eval HF conventions)' if self.token_path else
              f'byte-level through {type(self.view).__name__}')

    # loglikelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
      return self.scorer([(c, k) for _, c, k in requests])

    def loglikelihood(self, requests, disable_tqdm=False):
      t0 = time.perf_counter()
      if self.token_path:
        out = super().loglikelihood(requests, disable_tqdm=True)
      else:
        out = [tuple(x) for x in share(
            [(_cut_left(c.encode(), self.max_bytes), k.encode())
             for c, k in (r.args for r in requests)], self.view.loglikelihoods,
            'byte-level loglikelihood requests')]
      self._count(len(requests), t0)
      return out

    def _count(self, n, t0):
      self.stats['requests'] += n
      self.stats['seconds'] += time.perf_counter() - t0

    # rolling
    def loglikelihood_rolling(self, requests, disable_tqdm=False):
      t0 = time.perf_counter()
      u = lm_eval.utils
      out, windows, whole = [], [], []  # the byte path: windows (document, context,
      # prediction) with max_bytes, else whole documents (index, bytes)
      for d, (text,) in enumerate(r.args for r in requests):
        if self.token_path:
          ids = [int(i) for i in self.encoder.encode(text)]
          wins = [u.make_disjoint_window(w) for w in u.get_rolling_token_windows(
              token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.window,
              context_len=1)]
          out.append(sum(lp for lp, _ in self.scorer(wins)))
          continue
        data = text.encode()
        out.append(0.0)
        if self.max_bytes <= 0:
          whole.append((d, data))
          continue
        for ctx, pred in (u.make_disjoint_window(w) for w in u.get_rolling_token_windows(
            token_list=list(data), prefix_token=-1, max_seq_len=self.max_bytes, context_len=1)):
          ctx = bytes(b for b in ctx if b >= 0)  # -1: the document start (the view's own)
          windows.append((d, ctx, bytes(pred)))
      scores = share([(c, p) for _, c, p in windows], self.view.loglikelihoods,
                     'byte-level rolling windows')
      for (d, _, _), (lp, _) in zip(windows, scores):
        out[d] += lp
      lps = share([data for _, data in whole],
                  lambda docs: [float(self.view.score(x, end=False).sum()) for x in docs],
                  'byte-level rolling documents')
      for (d, _), lp in zip(whole, lps):
        out[d] = lp
      self._count(len(requests), t0)
      return out

    # generation
    def generate_until(self, requests, disable_tqdm=False):
      t0 = time.perf_counter()
      out = share([r.args for r in requests], self._generate, 'generate_until requests')
      self._count(len(requests), t0)
      return out

    def _generate(self, args: list) -> list[str]:
      out = []
      for context, kw in args:
        kw = dict(kw or {})
        until = kw.get('until') or []
        until = [until] if isinstance(until, str) else list(until)
        n = int(kw.get('max_gen_toks', 256))
        temp = float(kw.get('temperature', 0.0)) if kw.get('do_sample') else 0.0
        seed = int(lm_cfg.seed)
        if self.token_path:
          text = self._generate_tokens(context, until, n, temp, seed)
        else:
          text = self._generate_bytes(context, until, n, temp, seed)
        for s in until:
          if s and s in text:
            text = text[:text.index(s)]
        out.append(text)
      return out

    def _generate_tokens(self, context, until, n, temp, seed):
      if self._fn is None:
        self._fn = byte_level.TokenFn(self.local_model)
      ids = self.tok_encode(context)[-max(1, self.window - n):]
      eos = self.encoder.eos_id

      def done(toks):
        text = self.tok_decode([t for t in toks if t != eos])
        return any(s and s in text for s in until)

      toks = byte_level.token_generate(self._fn, ids, n, stop_ids=(eos,), temperature=temp,
                                       rng=np.random.default_rng(seed), done=done)
      return self.tok_decode([t for t in toks if t != eos])

    def _generate_bytes(self, context, until, n, temp, seed):
      rng = np.random.default_rng(seed)
      view = self.view
      st = view.start(_cut_left(context.encode(), self.max_bytes))
      out = bytearray()
      for i in range(n):
        b = byte_level.pick(view.next_byte_logprobs(st), temp, 1.0, rng)
        if b == byte_level.END:
          break
        out.append(b)
        text = out.decode('utf-8', errors='ignore')
        if any(s and s in text for s in until) or i == n - 1:
          break
        st = view.advance(st, b)
      return out.decode('utf-8', errors='replace')

  return NotokLM()


# -- tasks -----------------------------------------------------------------------------------------
def task_names(lm_cfg) -> list[str]:
  return [t.strip() for t in str(lm_cfg.tasks).split(',') if t.strip()]


def check_config(lm_cfg) -> None:
  """ValueErrors for option values no evaluation can run with (before anything loads)."""
  if not task_names(lm_cfg):
    raise ValueError('lm_eval.tasks is empty: name lm-eval tasks, comma-separated (e.g. '
                     '--config.lm_eval.tasks=arc_easy,hellaswag)')
  if lm_cfg.limit is not None and lm_cfg.limit <= 0:
    raise ValueError(f'lm_eval.limit={lm_cfg.limit}: must be > 0 (items per task; below 1: a '
                     'fraction of each task), or left unset for every item')
  if lm_cfg.scoring not in SCORINGS:
    raise ValueError(f'lm_eval.scoring={lm_cfg.scoring!r}: expected one of {list(SCORINGS)}')
  if int(lm_cfg.batch_size) < 1:
    raise ValueError(f'lm_eval.batch_size={lm_cfg.batch_size}: must be >= 1')
  if lm_cfg.include_path and not os.path.isdir(lm_cfg.include_path):
    raise FileNotFoundError(f'lm_eval.include_path: no folder {lm_cfg.include_path}')


_MANAGERS: dict = {}


def task_manager(lm_cfg):
  """lm-eval's `TaskManager` for `lm_eval.tasks`, one per folder and process. Where every task
  named is a plain task of the folder `lm_eval.include_path`, that folder alone is indexed
  (milliseconds); else lm-eval's whole registry too (about 14,000 YAML files: about 8 s of
  CPU here, paid by every --mode=lm_eval process)."""
  lm_eval = _lm_eval()
  from lm_eval.tasks._index import Kind  # pylint: disable=import-outside-toplevel
  inc = os.path.abspath(str(lm_cfg.include_path)) if lm_cfg.include_path else None
  if inc:
    if (inc, False) not in _MANAGERS:
      _MANAGERS[(inc, False)] = lm_eval.tasks.TaskManager(include_path=inc,
                                                          include_defaults=False)
    local = _MANAGERS[(inc, False)]
    entries = [local.task_index.get(n) for n in task_names(lm_cfg)]
    if entries and all(e is not None and e.kind in (Kind.TASK, Kind.PY_TASK) for e in entries):
      return local
  if (inc, True) not in _MANAGERS:
    _MANAGERS[(inc, True)] = lm_eval.tasks.TaskManager(include_path=inc)
  return _MANAGERS[(inc, True)]


def _spec(name: str, tm):
  """What lm-eval is given for the task `name`: its name, or, for a YAML whose local
  `dataset_kwargs.data_files` are relative paths, its config with them resolved against the
  YAML's folder (lm-eval would read them from the current directory)."""
  import copy  # pylint: disable=import-outside-toplevel
  entry = tm.task_index.get(name)
  cfg = getattr(entry, 'cfg', None)
  path = getattr(entry, 'yaml_path', None)
  files = ((cfg or {}).get('dataset_kwargs') or {}).get('data_files') if cfg else None
  if not files or path is None:
    return name
  here = os.path.dirname(str(path))

  def fix(f):
    if isinstance(f, str) and not os.path.isabs(f) and '://' not in f and \
        os.path.exists(os.path.join(here, f)):
      return os.path.join(here, f)
    return [fix(x) for x in f] if isinstance(f, list) else f

  cfg = copy.deepcopy(cfg)
  d = cfg['dataset_kwargs']['data_files']
  cfg['dataset_kwargs']['data_files'] = ({k: fix(v) for k, v in d.items()} if isinstance(d, dict)
                                         else fix(d))
  return cfg


def load_tasks(lm_cfg, tm=None) -> tuple[list, dict]:
  """The tasks of `lm_cfg.tasks`, their data loaded: (what lm-eval is given for them, {name:
  Task}, groups expanded). An unknown name (naming the closest) or a task whose data is not
  available offline is one ValueError."""
  lm_eval = _lm_eval()
  from lm_eval.tasks import get_task_dict  # pylint: disable=import-outside-toplevel
  tm = tm or task_manager(lm_cfg)
  known = tm.all_tasks
  for name in task_names(lm_cfg):
    if name not in known:
      close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
      hint = f'; the closest is {close[0]!r}' if close else ''
      inc = (f' and the folder {lm_cfg.include_path}' if lm_cfg.include_path else
             ' (add a folder of task YAMLs with lm_eval.include_path)')
      raise ValueError(f'lm_eval.tasks: unknown task {name!r}{hint}. Tasks are lm-eval\'s '
                       f'registry{inc}')
  specs, out = [], {}
  for name in task_names(lm_cfg):
    spec = _spec(name, tm)
    try:
      got = get_task_dict([spec], tm)
    except Exception as e:  # pylint: disable=broad-except
      if not _offline_error(e):
        raise
      raise ValueError(
          f'lm_eval.tasks: the data of task {name!r} is not available on this machine (it is '
          f'offline: {type(e).__name__}: {str(e).splitlines()[0][:200]}). Point it at local '
          'data: a task YAML in lm_eval.include_path with `dataset_path: json` and '
          '`dataset_kwargs: {data_files: {test: FILE}}` (see tests/data/lm_eval/), or run it on '
          'a machine connected to the Hugging Face hub') from None
    specs.append(spec)
    out.update(_leaves(got, lm_eval))
  return specs, out


def _offline_error(e: BaseException) -> bool:
  text = f'{type(e).__name__} {e}'.lower()
  return any(w in text for w in ('offline', 'connection', 'couldn', 'not found', 'no such file',
                                 'doesn\'t exist', 'does not exist', 'hub', 'http'))


def _leaves(d: dict, lm_eval) -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_leaves(v, lm_eval))
    else:
      out[getattr(k, 'group_name', k) if not isinstance(k, str) else k] = v
  return out


def output_types(tasks: dict) -> set[str]:
  return {getattr(t, 'OUTPUT_TYPE', None) or t.config.output_type for t in tasks.values()}


def can_score(family) -> str:
  """'' when `family`'s (an instance or its class) models can be evaluated, else why not (no byte-level view: no text
  probabilities and no sampler)."""
  from train import families  # pylint: disable=import-outside-toplevel
  cls = family if isinstance(family, type) else type(family)
  if cls.byte_view is families.Family.byte_view:
    return (f'family {cls.__module__.rsplit(".", 1)[-1]!r} has no byte-level view: it gives no text probabilities and '
            'cannot sample text')
  return ''


def check_family(family, tasks: dict, what: str) -> None:
  """A ValueError when `family` cannot answer the requests `tasks` make."""
  why = can_score(family)
  if not why:
    return
  gen = sorted(n for n, t in tasks.items() if t.config.output_type == 'generate_until')
  if gen:
    raise ValueError(f'lm_eval.tasks: {", ".join(gen)} generate text, but {what} cannot sample: '
                     f'{why}')
  raise ValueError(f'lm_eval: {what} cannot be scored: {why}')


# -- one evaluation --------------------------------------------------------------------------------
def versions() -> dict:
  out = {}
  for p in ('lm-eval', 'datasets', 'jax', 'jaxlib', 'flax', 'numpy', 'tokenizers'):
    try:
      out[p] = importlib.metadata.version(p)
    except importlib.metadata.PackageNotFoundError:
      out[p] = None
  return out


def evaluate(lm, lm_cfg, specs: list | None = None, tm=None) -> dict:
  """lm-eval's `simple_evaluate` of `lm` on `lm_cfg.tasks`: its result dict (results, configs,
  versions, n-samples, ...), plus 'notoklm' (requests, seconds, compiled shapes)."""
  lm_eval = _lm_eval()
  tm = tm or task_manager(lm_cfg)
  if specs is None:
    specs, _ = load_tasks(lm_cfg, tm)
  seed = int(lm_cfg.seed)
  res = lm_eval.simple_evaluate(
      model=lm, tasks=specs, task_manager=tm,
      num_fewshot=None if int(lm_cfg.num_fewshot) < 0 else int(lm_cfg.num_fewshot),
      limit=lm_cfg.limit, bootstrap_iters=int(lm_cfg.bootstrap_iters), log_samples=False,
      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
      fewshot_random_seed=seed)
  res['notoklm'] = {'scoring': lm.describe, **lm.stats,
                    'compiled_shapes': sorted(lm.scorer.shapes) if lm.token_path else []}
  return res


def metrics_of(res: dict) -> dict:
  """{task: {metric: value}} of the numbers in lm-eval's results ('acc,none' -> 'acc')."""
  out = {}
  for task, r in res.get('results', {}).items():
    m = {}
    for k, v in r.items():
      name, _, filt = k.partition(',')
      if isinstance(v, (int, float)) and not isinstance(v, bool) and name != 'alias' and \
          math.isfinite(float(v)):
        m[name if filt in ('none', '') else f'{name}_{filt}'] = float(v)
    out[task] = m
  return out


def markdown(res: dict) -> str:
  """lm-eval's results as a Markdown table: task, version, shots, metric, value, stderr."""
  lines = ['| task | version | shots | metric | value | stderr |', '|---|--:|--:|---|--:|--:|']
  for task, r in sorted(res.get('results', {}).items()):
    for key, v in r.items():
      name, _, filt = key.partition(',')
      if name == 'alias' or name.endswith('_stderr') or not isinstance(v, (int, float)):
        continue
      se = r.get(f'{name}_stderr,{filt}')
      se = f'{se:.4f}' if isinstance(se, (int, float)) else '-'
      label = name if filt in ('none', '') else f'{name} ({filt})'
      lines.append(f'| {task} | {res.get("versions", {}).get(task, "")} | '
                   f'{res.get("n-shot", {}).get(task, "")} | {label} | {v:.4f} | {se} |')
  return '\n'.join(lines) + '\n'


def write(res: dict, lm_cfg, directory: str, step: int, extra: dict) -> str:
  """`directory/step_N.json` (lm-eval's results, the config, package versions and seed) and
  `step_N.md` (lm-eval's table); returns the Markdown."""
  storage.makedirs(directory)
  table = markdown(res)
  record = {'step': step, **extra, 'lm_eval_config': lm_cfg.to_dict(), 'seed': int(lm_cfg.seed),
            'versions': versions(), 'notoklm': res.get('notoklm'),
            'results': res.get('results'), 'groups': res.get('groups'),
            'n-samples': res.get('n-samples'), 'task_versions': res.get('versions'),
            'n-shot': res.get('n-shot'), 'configs': res.get('configs')}
  storage.write_text(storage.join(directory, f'step_{step}.json'),
                     json.dumps(record, indent=1, default=str))
  md = (f'# lm-eval at step {step}\n\n' + ''.join(f'- {k}: {v}\n' for k, v in extra.items())
        + f'- scoring: {res["notoklm"]["scoring"]}\n\n' + table)
  storage.write_text(storage.join(directory, f'step_{step}.md'), md)
  return md


# -- the evaluator type ------------------------------------------------------------------------
class Evaluator(evals.Evaluator):
  """`config.evals.NAME = {'type': 'lm_eval', 'every': N}`: the tasks of `config.lm_eval`
  (options of the entry override its keys, e.g. tasks or limit) every N steps in the training
  loop and for each new checkpoint in `--mode=evaluator`; results nested under the entry's name
  as {task: {metric: value}} and written to `WORKDIR/lm_eval/step_N.json` / `.md`."""

  order = 30

  def __init__(self, name, cfg, options):
    super().__init__(name, cfg, options)
    self.lm_cfg = cfg.lm_eval.copy_and_resolve_references()
    for k, v in self.options.items():
      if k not in self.lm_cfg:
        raise ValueError(f'evals.{name}.{k}: not an lm_eval option ({", ".join(self.lm_cfg)})')
      with self.lm_cfg.unlocked():
        self.lm_cfg[k] = v
    self.specs = self.tm = None

  def prepare(self, setup) -> str:
    check_config(self.lm_cfg)
    self.tm = task_manager(self.lm_cfg)
    self.specs, tasks = load_tasks(self.lm_cfg, self.tm)
    check_family(setup.family, tasks, f'family {setup.family.name!r}')
    return f'lm_eval: {", ".join(tasks)}'

  def run(self, setup, params, workdir, step, earlier):
    lm = make_lm(setup.family, setup.model(params), self.lm_cfg,
                 window=int(self.cfg.data.seq_len), mesh=setup.mesh)
    res = evaluate(lm, self.lm_cfg, self.specs, self.tm)
    if jax.process_index() == 0:
      write(res, self.lm_cfg, storage.join(workdir, 'lm_eval'), step, {'evaluator': self.name})
    out = metrics_of(res)
    log0(f'[lm_eval] step {step}: ' + '; '.join(
        f'{t} ' + ', '.join(f'{k} {v:.4f}' for k, v in m.items() if not k.endswith('stderr'))
        for t, m in out.items()))
    return out
