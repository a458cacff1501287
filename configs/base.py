"""Shared config keys: trainer, data, mesh, checkpointing, logging, eval, sampling.

Every family config starts from `base.get_config()` and fills in `family`, `model.*`
and its presets. Configs are the only home of hyperparameters.
"""
import ml_collections


def _evaluator(kind: str, every: int, **options) -> ml_collections.ConfigDict:
  """One `config.evals` entry: its type, when it runs, its options."""
  return ml_collections.ConfigDict({'type': kind, 'every': every, **options})


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.family = ''            # a module of train/families/ (e.g. 'lm', 'hat')
  c.seed = 0

  # Data -------------------------------------------------------------------
  c.data = d = ml_collections.ConfigDict()
  d.source = 'python_docs'   # 'python_docs' (embedded) | 'text:PATH[,PATH...]' | 'tfds:NAME[/CONFIG]'
                             # | 'shards:GLOB[,GLOB...]' (parquet/jsonl[.gz]/txt, local or gs://;
                             # streamed, each host its share: data/shards.py)
  d.eval_source = ''         # shards: only: validation files 'GLOB[,GLOB...]' ('' = a held-out
                             # 2 % of the documents, by a stable hash of their text)
  d.shuffle_buffer = 1024    # shards: only: documents shuffled together (held in memory)
  d.bpe_sample_bytes = 64_000_000  # shards: only: seeded sample a BPE is trained on
  d.data_dir = ''            # TFDS data dir; '' -> $NOTOKLM_DATA_DIR or ~/.cache/notoklm/tfds
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.text_key = 'text'        # feature / jsonl field holding the text
  d.txt_split = 'paragraph'  # local .txt files: 'file' | 'paragraph' (blank lines) | 'line'
  d.max_doc_chars = 100_000  # longer documents are cut into pieces (counted)
  d.val_fraction = 0.02      # text: only: documents held out for validation (stable hash of each)
  d.val_min_bytes = 0        # text: only: more documents (next by hash) until validation holds this
  d.max_docs = 0             # >0: use only the first N documents of each split (smoke runs)
  d.doc_filter = ''          # regex: only documents whose 'name' matches (e.g. the embedded
                             # corpus's prose '^(topic|docstring)/', its code '^src/')
  d.char_map = ''            # 'FROM=TO' (e.g. 'qrstuvwxyz=abcdefghij'): characters mapped in every
                             # document of every split before encoding ('' = none; 'FROM=':
                             # those characters removed, e.g. ' =' for text without spaces)
  d.encoder = 'bytes'        # 'bytes' | 'bpe' (trained on the train split, cached) | 'tokenizer:PATH'
  d.vocab_size = 0           # bpe only
  d.seq_len = 256            # tokens per packed row
  d.shuffle = True
  d.prefetch = 2             # batches prepared ahead on a host thread
  d.workers = 0              # >0: the host's batches built by this many processes (tokenizing,
                             # word splitting, packing in parallel; data/host_workers.py); each
                             # builds batch_size / processes / workers rows

  # Trainer ------------------------------------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.batch_size = 16          # global rows per optimizer step
  t.grad_accum = 1           # micro-batches per step (batch_size % grad_accum == 0)
  t.steps = 100
  t.flops_budget = 0.0       # >0: steps = budget / training FLOPs per step (family accounting)
  t.log_every = 10
  t.eval_every = 0           # 0: only at the end
  t.eval_count = 0           # >0: evaluate this many times along the run (sets eval_every from
                             # the resolved steps, e.g. under a FLOP budget)
  t.eval_batches = 0         # 0: the whole validation split
  t.nan_policy = 'stop'      # non-finite loss/grads: the update is never applied; then
                             # 'stop' (exit 1, checkpoints kept) | 'skip' (count, go on)
  t.compute_dtype = 'auto'   # 'auto' (bf16 on GPU/TPU, fp32 on CPU) | 'float32' | 'bfloat16'

  c.optim = o = ml_collections.ConfigDict()
  o.lr = 3e-3
  o.warmup_steps = 10
  o.min_lr_ratio = 0.1       # the schedule decays to lr * min_lr_ratio
  o.schedule = 'cosine'      # 'cosine' | 'wsd' (warmup-stable-decay: extendable; train/optim.py)
  o.decay_frac = 0.2         # wsd: the final decay's fraction of train.steps
  o.b1 = 0.9
  o.b2 = 0.95
  o.eps = 1e-8
  o.weight_decay = 0.1
  o.clip_norm = 1.0

  # Evaluation options (the robustness and next_word evaluators) ---------------------
  c.eval = e = ml_collections.ConfigDict()
  e.robustness = 'caps,permute,delete,replace'  # '' to skip; see data/perturb.py
  e.noise_frac = 0.1         # fraction of characters per word permuted/deleted/replaced
  e.noise_seed = 0
  e.next_word = True         # next-word accuracy (train/evals/next_word.py; families with text)
  e.next_word_bytes = 200    # ... on windows of N bytes of the validation text
  e.next_word_texts = 32     # ... this many of them, evenly spread (0: all)

  # Evaluators (train/evals/__init__.py) -----------------------------------------------
  # name -> {type: a module of train/evals/ with an Evaluator class, every, options...}.
  # every > 0: in the training loop every N steps and at the last step; -1: every
  # train.eval_every steps and at the last step; 0: not in the loop. --mode=eval runs every
  # entry, --mode=evaluator those with every != 0. Results: eval/<metric> (flat types) or
  # eval/<name>/<metric> in TensorBoard, eval_metrics.jsonl, evaluator.jsonl, eval_step{N}.json.
  c.evals = v = ml_collections.ConfigDict()
  v.validation = _evaluator('validation', every=-1)     # loss, bits per byte
  v.robustness = _evaluator('robustness', every=0)      # eval.robustness kinds
  v.next_word = _evaluator('next_word', every=0)        # eval.next_word*
  v.family_suite = _evaluator('family_suite', every=0)  # the family's own eval_suite
  # named sets scored like-for-like through the byte view ('NAME=FILE,...' or 'val'; '' = off):
  # the same bytes, each piece of <= context_bytes bytes scored alone (train/evals/held_out.py)
  v.held_out = _evaluator('held_out', every=0, sets='', context_bytes=200, max_bytes=0)

  # Standard benchmarks (--mode=lm_eval, evaluator type lm_eval; train/evals/lm_eval.py) -------
  c.lm_eval = le = ml_collections.ConfigDict()
  le.tasks = ''              # comma-separated lm-eval task (or group) names
  le.include_path = ''       # a folder of task YAMLs beside lm-eval's own (e.g. tests/data/lm_eval)
  le.num_fewshot = -1        # -1: each task's own default
  le.limit = ml_collections.config_dict.placeholder(float)  # items per task (<1: a fraction)
  le.batch_size = 8          # rows per padded batch (token-level scoring)
  le.scoring = 'tokens'      # 'tokens' (lm-eval's HF conventions) or 'bytes' (exact byte-level);
                             # byte-level families are always scored over bytes
  le.max_length = 0          # the token window (0: data.seq_len); contexts truncated on the left
  le.max_bytes = 0           # byte-level scoring: contexts cut to their last N bytes (0: whole)
  le.add_bos = True          # documents start after the begin token (as the runs were trained)
  le.bootstrap_iters = 1000  # lm-eval's bootstrap for standard errors (0: none)
  le.seed = 0                # few-shot sampling and lm-eval's random seeds
  le.model = ''              # '': the run in --workdir; else a run workdir or pretrained:SOURCE

  # Parallelism --------------------------------------------------------------
  c.mesh = m = ml_collections.ConfigDict()
  m.data = -1                # -1: all devices not used by fsdp
  m.fsdp = 1

  # Checkpointing ------------------------------------------------------------
  c.ckpt = k = ml_collections.ConfigDict()
  k.every = 50
  k.keep = 3
  k.async_save = True

  # Sampling -----------------------------------------------------------------
  c.sample = s = ml_collections.ConfigDict()
  s.prompt = 'def '
  s.max_new_tokens = 64
  s.temperature = 0.8
  s.top_p = 0.95
  s.seed = 0
  s.byte_level = False       # --mode=sample through the family's byte view (exact next-byte
                             # probabilities; max_new_tokens counts bytes); a BPE model also
                             # shows plain token-level decoding and token healing beside it
  return c
