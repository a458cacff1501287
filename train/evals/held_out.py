"""Named evaluation sets scored like-for-like: evaluator type 'held_out'.

Every model, whatever its units (bytes, BPE tokens, words), is scored through its byte-level
view (`Family.byte_view`) on the same bytes with the same context in bytes: each set is cut
into pieces of at most `context_bytes` bytes (train/evals/byte_views.py `cut`: after a newline
in the second half of the window, else at a UTF-8 character start) and each piece is scored as
a text of its own. Two runs of different families evaluated with the same entry have scored
exactly the same bytes, each byte seeing the same preceding bytes -- unlike the validation
evaluator, whose rows hold `seq_len` *units* (64 BPE tokens are ~140 bytes, 256 HAT bytes are
256 bytes) and whose `train.eval_batches` count rows, not bytes.

Options of an entry (`configs/base.py` has one, `evals.held_out`, off until given sets):
  * `sets`: 'NAME=PATH[,NAME=PATH...]'; PATH a text file (local or a bucket URL), scored whole
    as one document; the name `val` alone (no '=') is the run's validation split
    (`data.eval_split`), each document a text ending with its end of text.
  * `context_bytes` (default 200, as `byte_eval.piece_bytes`): the piece size, i.e. the most
    context any byte gets; keep it within the training context of every model compared (the
    tiny subword LM's 64 tokens are ~140-250 bytes), as no view extends a model's window.
  * `max_bytes` (default 0 = everything): pieces spread evenly over the set up to about this
    many bytes.

Results, under the entry's name and then the set's: `bpb`, `n_bytes` (scored), `n_pieces`,
`context_bytes`, `source`, `sha1` (of the scored bytes) and `seconds`; the record of every
evaluation thus says what was measured.
"""
from __future__ import annotations

import hashlib
import os
import time

from data import corpus
from train import config_lib, evals, storage
from train.evals import byte_views
from train.metrics import log0

DEFAULT_CONTEXT_BYTES = 200


def parse_sets(spec: str) -> dict[str, str]:
  """'play=/x/play.txt,val' -> {'play': '/x/play.txt', 'val': 'val'}; a ConfigError names a bad
  entry."""
  out: dict[str, str] = {}
  for part in [p.strip() for p in str(spec or '').split(',') if p.strip()]:
    name, eq, path = part.partition('=')
    name, path = name.strip(), path.strip()
    if not eq:
      if name != 'val':
        raise config_lib.ConfigError(
            f'evals.held_out.sets: {part!r} has no file: write NAME=PATH (or `val` for the '
            'validation split)')
      path = 'val'
    if not name.isidentifier() or not path:
      raise config_lib.ConfigError(f'evals.held_out.sets: {part!r}: expected NAME=PATH with NAME '
                                   'a plain word')
    if name in out:
      raise config_lib.ConfigError(f'evals.held_out.sets: the set {name!r} is named twice')
    if path != 'val' and not storage.is_remote(path):
      path = os.path.abspath(os.path.expanduser(path))
    out[name] = path
  return out


def _items(cfg, path: str, context_bytes: int) -> list[tuple[bytes, bool]]:
  if path == 'val':
    docs = corpus.get_source(cfg.data, cfg.data.eval_split)
    return byte_views.pieces(docs, context_bytes)
  if not storage.exists(path):
    raise config_lib.ConfigError(f'evals.held_out.sets: the file {path} does not exist')
  data = storage.read_bytes(path)
  if not data:
    raise config_lib.ConfigError(f'evals.held_out.sets: the file {path} is empty')
  return byte_views.pieces([data], context_bytes)


class Evaluator(evals.Evaluator):
  """Evaluator type 'held_out' (see the module doc). The sets are read once (`prepare`)."""

  order = 15

  def __init__(self, name, cfg, options):
    super().__init__(name, cfg, options)
    self.sets = parse_sets(self.options.get('sets', ''))
    ctx = self.options.get('context_bytes', DEFAULT_CONTEXT_BYTES)
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 8:
      raise config_lib.ConfigError(f'evals.{name}.context_bytes={ctx!r}: must be an integer >= 8')
    mb = self.options.get('max_bytes', 0)
    if not isinstance(mb, int) or isinstance(mb, bool) or mb < 0:
      raise config_lib.ConfigError(f'evals.{name}.max_bytes={mb!r}: must be an integer >= 0 '
                                   '(0: the whole set)')
    self.context_bytes, self.max_bytes = ctx, mb
    self.items: dict[str, list] | None = None

  def prepare(self, setup) -> str:
    del setup
    if not self.sets:
      return ''
    self.items = {n: byte_views.spread(_items(self.cfg, p, self.context_bytes), self.max_bytes)
                  for n, p in self.sets.items()}
    return (f'{self.name}: ' + ', '.join(f'{n} {byte_views.n_bytes(it):,} bytes'
                                         for n, it in self.items.items())
            + f' in pieces of <= {self.context_bytes} bytes')

  def run(self, setup, params, workdir, step, earlier):
    del workdir, step, earlier
    if not self.sets:
      return None
    if self.items is None:
      self.prepare(setup)
    from train.evals import next_word  # pylint: disable=import-outside-toplevel
    try:
      view = setup.family.byte_view(setup.model(next_word._local_params(params)))  # pylint: disable=protected-access
    except ValueError as e:
      return {'skipped': f'no byte-level view: {e}'}
    out = {}
    for name, items in self.items.items():
      t0 = time.perf_counter()
      scored = byte_views.score(view, items, what=f'evals.{self.name} set {name!r}')
      h = hashlib.sha1()
      for p, _ in items:
        h.update(p)
      out[name] = {'bpb': scored.bpb(), 'n_bytes': scored.n_bytes, 'n_pieces': len(items),
                   'context_bytes': self.context_bytes, 'source': self.sets[name],
                   'sha1': h.hexdigest()[:16], 'seconds': round(time.perf_counter() - t0, 2)}
      log0(f'{self.name} {name}: bits per byte {out[name]["bpb"]:.4f} ({scored.n_bytes:,} bytes '
           f'in {len(items)} pieces of <= {self.context_bytes} bytes, {self.sets[name]})')
    return out
