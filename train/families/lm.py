"""Token LM family (`family='lm'`): the byte-level and subword baselines, one model
(models/token_lm.py) over two encoders (`data.encoder`: 'bytes', 'bpe' or 'tokenizer:PATH').

Subclasses (pretrained, lexinv) reuse its data path and override `make_encoder` /
`model_config` (how the encoder and the architecture are obtained) or the model hooks."""
from __future__ import annotations

import io

import jax
import numpy as np
import tokenizers

from data import encoders, pipeline
from models import byte_level, glyphs, pretrained, token_lm
from train import families


class TokenLMFamily(families.Family):
  host_workers = True  # data.workers: pipeline.make_train_iterator

  def __init__(self, cfg, workdir=None):
    super().__init__(cfg, workdir)
    self.model_cfg = self.model_config()
    self.encoder = self.make_encoder()
    self._glyphs = None
    if self.glyphs:  # a missing font or a tied readout fails now, before anything runs
      glyphs.resolve_font(self.model_cfg.get('glyph_font', ''))
      if self.model_cfg.tie_embeddings:
        raise ValueError("model.input_embedding='glyph' needs model.tie_embeddings=False: the "
                         'frozen glyph table cannot also be the trained readout')

  # -- what subclasses change ------------------------------------------------------------------
  def model_config(self):
    """The `model.*` keys the model is built from (default: the config's)."""
    return self.cfg.model

  def make_encoder(self) -> encoders.Encoder:
    """The text <-> ids encoder: the run's recorded tokenizer, else `data.encoder` (a BPE is
    trained on the current data then, and recorded when training starts)."""
    recorded = self.recorded('tokenizer.json') if self.cfg.data.encoder != 'bytes' else None
    if recorded is not None:
      return encoders.BPEEncoder(tokenizers.Tokenizer.from_str(recorded.decode()),
                                 f'{self.cfg.data.encoder} (recorded in {self.workdir})')
    return encoders.get_encoder(self.cfg.data)

  def artifacts(self) -> dict[str, bytes]:
    out = {}
    if isinstance(self.encoder, encoders.BPEEncoder):
      out['tokenizer.json'] = self.encoder.tokenizer.to_str().encode()
    if self.glyphs:
      buf = io.BytesIO()
      np.save(buf, self.glyph_table())
      out[GLYPH_FILE] = buf.getvalue()
    return out

  # -- frozen glyph embeddings (model.input_embedding='glyph') -------------------------------------
  @property
  def glyphs(self) -> bool:
    return self.model_cfg.get('input_embedding', 'learned') == 'glyph'

  def glyph_table(self) -> np.ndarray:
    """The frozen input table: the run's recorded copy (what it was trained with), else
    rendered now (models/glyphs.py; counts in the run's data stats)."""
    if self._glyphs is None:
      recorded = self.recorded(GLYPH_FILE) if self._manifest is not None and GLYPH_FILE in \
          self._manifest['files'] else None
      if recorded is not None:
        self._glyphs = np.load(io.BytesIO(recorded))
      else:
        m = self.model_cfg
        self._glyphs, stats = glyphs.glyph_table(
            glyphs.encoder_token_bytes(self.encoder), m.d_model, m.get('glyph_font', ''),
            m.get('glyph_size', 16), m.get('glyph_chars', 8), m.get('glyph_seed', 0))
        self._stats.update(stats)
    return self._glyphs

  def frozen_params(self):
    if not self.glyphs:
      return None
    return {'embed': {'embedding': self.glyph_table()}}

  # -- Family hooks ----------------------------------------------------------------------------
  def build_model(self, rngs):
    return token_lm.TokenLM(self.model_cfg, self.encoder.vocab_size, self.dtype, rngs=rngs)

  def loss(self, model, batch, rng):
    return token_lm.lm_loss(model, batch, rng)

  def train_iterator(self, process_index: int, process_count: int):
    it = pipeline.make_train_iterator(self.cfg, self.encoder, process_index, process_count)
    self.track_source(it.source)  # a prepared dataset's counts, or a stream's so far
    return it

  def eval_batches(self, process_index: int, process_count: int, max_batches: int = 0,
                   perturbation: str | None = None):
    return pipeline.make_eval_batches(self.cfg, self.encoder, process_index, process_count,
                                      max_batches, perturbation)

  def sample(self, model, cfg_sample) -> list[str]:
    return sample_text(token_lm.generate, model, self.encoder, cfg_sample)

  def flops_per_token(self) -> float:
    return token_lm.flops_per_token(self.model_cfg, self.encoder.vocab_size, self.cfg.data.seq_len)

  def byte_view(self, model):
    """Bytes: the model's own distribution; BPE: exact, over canonical encodings."""
    return token_byte_view(byte_level.TokenFn(model), self.encoder, self.name)

  def export_hf(self, model, out_dir: str) -> None:
    enc = self.encoder
    if not isinstance(enc, encoders.BPEEncoder):
      raise ValueError(f'--mode=export needs a token LM with a tokenizers-based encoder (data.'
                       f'encoder bpe or tokenizer:PATH); this run uses {type(enc).__name__}')
    pretrained.save_hf(model, self.model_cfg, enc.tokenizer, out_dir, enc.bos_id, enc.eos_id)

  def describe(self) -> str:
    e = self.encoder
    glyph = ''
    if self.glyphs:
      st = self._stats
      glyph = (f' | frozen glyph input embeddings ({st.get("glyph_rendered_tokens", "?")} '
               f'rendered, {st.get("glyph_fallback_tokens", "?")} fallback)')
    return (f'{type(e).__name__} vocab {e.vocab_size}{glyph} | data {self.cfg.data.source} | '
            f'seq_len {self.cfg.data.seq_len} | batch {self.cfg.train.batch_size} | '
            f'compute {np.dtype(self.dtype).name}')


Family = TokenLMFamily
GLYPH_FILE = 'glyph_table.npy'


def sample_text(generate, model, encoder, cfg_sample) -> list[str]:
  """Prompt -> text with a token-level `generate(model, ids, n, temperature, top_p, rng,
  eos_id)` (token_lm, lexinvariant), cut at the first eos."""
  prompt = encoder.encode(cfg_sample.prompt)
  ids = np.concatenate([[encoder.bos_id], prompt]).astype(np.int32)[None]
  out = generate(model, ids, cfg_sample.max_new_tokens, cfg_sample.temperature,
                 cfg_sample.top_p, jax.random.key(cfg_sample.seed), eos_id=encoder.eos_id)
  texts = []
  for row in np.asarray(out):
    stop = np.flatnonzero(row == encoder.eos_id)
    texts.append(cfg_sample.prompt + encoder.decode(row[:stop[0]] if stop.size else row))
  return texts


def token_byte_view(fn: byte_level.TokenFn, encoder, name: str) -> byte_level.ByteLM:
  """The byte-level view of a token LM (`fn`: token_lm, lexinvariant with a fixed draw) over
  the family's `encoder`: its own softmax over the byte ids for the bytes encoder
  (`byte_level.ByteTokenLM`), the exact marginal over canonical encodings for a byte-level BPE
  (`byte_level.ExactBPE`)."""
  if isinstance(encoder, encoders.ByteEncoder):
    return byte_level.ByteTokenLM(fn, name or 'bytes', encoder.bos_id, encoder.eos_id)
  if isinstance(encoder, encoders.BPEEncoder):
    return byte_level.ExactBPE(fn, encoder.tokenizer, encoder.bos_id, encoder.eos_id,
                               name or 'bpe')
  raise ValueError(f'no byte-level view for encoder {encoder!r}: exact byte probabilities '
                   f'need the bytes encoder or a byte-level BPE tokenizer')
