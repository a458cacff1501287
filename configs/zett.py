"""Zero-shot tokenizer transfer: train the embedding hypernetwork of a frozen pretrained LM.

  python launch.py --config=configs/zett.py:smollm2 --workdir=runs/zett_smollm2
  # then transfer with it (beside the FVT and lexical baselines)
  python launch.py --config=configs/pretrained.py:smollm2 --workdir=runs/smollm2_bpe8k \
      --mode=transfer --config.target_tokenizer=bpe:8192 \
      --config.transfer.methods=lexical,fvt,hypernet \
      --config.transfer.hypernet_workdir=runs/zett_smollm2

  # the sentence encoder all-MiniLM-L6-v2: sampled WordPiece vocabularies, sentence-embedding
  # cosine loss; then --mode=transfer with configs/pretrained.py:minilm
  python launch.py --config=configs/zett.py:minilm --workdir=runs/zett_minilm
  python launch.py --config=configs/pretrained.py:minilm --workdir=runs/minilm_wp8k \
      --mode=transfer --config.target_tokenizer=wordpiece:8192 \
      --config.transfer.methods=lexical,fvt,hypernet \
      --config.transfer.hypernet_workdir=runs/zett_minilm

Presets: `smollm2` (CPU-sized: 4k sampled vocabularies, 4 x 128 tokens per step),
`smollm2_gpu` (32k vocabularies, 32 x 512 tokens) and `minilm` (the family `zett_encoder`:
WordPiece vocabularies of at most 4k tokens sampled from 8 sentences of the English prose per
step, 128 tokens per sentence row). See train/families/zett.py (decoders) and
train/families/zett_encoder.py (encoders) for the step.
"""
import ml_collections

from configs import pretrained
from models import hypernet

PRESETS = ('smollm2', 'smollm2_gpu', 'minilm')


def get_config(preset: str = 'smollm2'):
  c = pretrained.get_config('smollm2')
  c.family = 'zett'
  c.hypernet = hypernet.default_config()
  c.hypernet.anchor = 'fvt'    # start from FVT, learn the correction (models/hypernet.py)
  c.hypernet.packed_slots = 2.5  # pieces packed, no work on padding (benchmarks/zett_step.py)
  c.zett = z = ml_collections.ConfigDict()
  z.vocab_size = 4096          # tokens of every sampled vocabulary (and of the eval tokenizer)
  z.noise_std = 1.0            # std of the log-normal noise on substring counts
  z.max_piece_chars = 16       # longest candidate token, in byte-alphabet characters
  z.sampler_docs = 16          # extra training documents per step for the substring counts
  z.sampler_doc_chars = 4000   # characters read from each
  z.warmup_steps = 20          # identity warm-up steps (short: the FVT anchor starts there)
  z.warmup_tokens = 1024       # base tokens per warm-up step
  z.aux_weight = 0.5           # auxiliary MSE on shared tokens
  z.bytes_per_token = 4        # text bytes read per row = seq_len * this (surplus tokens cut)
  z.max_text_bytes = 400       # encoders: longer sentences are re-split (data/sentences.py)
  c.data.seq_len = 128
  c.data.prefetch = 2
  t = c.train
  t.batch_size, t.steps, t.log_every, t.eval_batches = 4, 400, 10, 8
  c.optim.lr, c.optim.warmup_steps, c.optim.weight_decay = 2e-4, 20, 0.0
  c.ckpt.every = 100
  if preset == 'smollm2_gpu':
    z.vocab_size, z.sampler_docs = 32768, 64
    c.data.seq_len = 512
    t.batch_size, t.steps, t.eval_batches = 32, 20_000, 16
    z.warmup_steps = 1000
    c.ckpt.every = 1000
  if preset == 'minilm':
    c.model.source = 'minilm'
    c.family = 'zett_encoder'  # a BERT sentence encoder base (train/families/zett_encoder.py)
    z.warmup_steps = 0         # no identity warm-up: the FVT anchor starts there
    z.sampler_docs = 8         # training documents beside the step's sentences
    t.batch_size, t.eval_batches = 8, 8  # sentences per step / eval batches of 8 sentences
    c.hypernet.d_model, c.hypernet.num_layers, c.hypernet.mlp_dim = 128, 2, 512
    c.hypernet.packed_slots = 0.0  # the encoder batches carry the padded layout
  return c
