"""Pretrained family (`family='pretrained'`): a real pretrained Llama-architecture LM (GGUF file
or HF directory, see models/pretrained.py) as a `TokenLM`, with its own tokenizer.
`--mode=eval` on a workdir without checkpoints evaluates the file's weights (the baseline
tokenizer transfer is measured against); `train` fine-tunes them; eval / sample restore like
every family."""
from __future__ import annotations

import functools

import tokenizers
from flax import nnx

from data import encoders
from models import pretrained
from train.families import lm


@functools.lru_cache(maxsize=2)
def load_source(source: str) -> pretrained.Pretrained:
  """`model.source` ('smollm2', 'minilm', a .gguf path or an HF directory), loaded once per
  process."""
  named = {'smollm2': pretrained.smollm2_path, 'minilm': pretrained.minilm_path}
  return pretrained.load(named[source]() if source in named else source)


class PretrainedFamily(lm.TokenLMFamily):

  def __init__(self, cfg, workdir=None):
    self.loaded = load_source(cfg.model.source)
    if self.loaded.meta.get('kind') == 'encoder':
      raise ValueError(f'model.source={cfg.model.source}: a sentence encoder '
                       f'({type(self.loaded.model).__name__}), not a language model: it gives no '
                       'next-token probabilities, so there are no exact byte probabilities '
                       '(byte-level sampling, ensembles, reports) and nothing to train, '
                       'evaluate or sample; only --mode=transfer takes it')
    super().__init__(cfg, workdir)

  def model_config(self):
    """The architecture read from the file, also written into the run's config (config.json
    then records what was trained)."""
    m = self.loaded.cfg_model
    for k, v in m.items():
      if k in self.cfg.model:
        self.cfg.model[k] = v
    return m

  def make_encoder(self) -> encoders.Encoder:
    m = self.loaded.meta
    doc = m['doc_token_id']
    specials = {'pad': doc, 'bos': doc, 'eos': doc}  # documents between the separator token
    if m['format'] == 'hf' and all(isinstance(m.get(k), int) and m[k] >= 0
                                   for k in ('bos_id', 'eos_id')):
      specials = {'pad': m['eos_id'], 'bos': m['bos_id'], 'eos': m['eos_id']}  # as declared
    vocab = self.loaded.model.embed.embedding.shape[0]
    recorded = self.recorded('tokenizer.json')  # a fine-tuning run's own copy
    tok = (tokenizers.Tokenizer.from_str(recorded.decode()) if recorded is not None
           else self.loaded.tokenizer)
    return encoders.BPEEncoder(tok, f'{m["format"]}:{m["source"]}', specials=specials,
                               vocab_size=vocab)

  def initial_params(self):
    """The file's weights as the pure parameter dict `Setup` places on the mesh."""
    return nnx.to_pure_dict(nnx.state(self.loaded.model))

  def has_own_weights(self) -> bool:
    return True

  def describe(self) -> str:
    m = self.model_cfg
    return (f'pretrained {self.loaded.meta["source"]} ({m.num_layers} layers, d {m.d_model}, '
            f'{m.num_heads}/{m.num_kv_heads} heads) | ' + super().describe())


Family = PretrainedFamily
