"""Runs in the reference environment (.venv-ref: CPython 3.11, torch CPU, transformers):
  python hf_llama_logits.py MODEL_DIR IDS.npy OUT.npy
loads an HF-format Llama directory with transformers' LlamaForCausalLM (float32, eager
attention) and saves the logits of the token ids (int [B, T]) as float32 [B, T, V]."""
import sys

import numpy as np
import torch
from transformers import LlamaForCausalLM


def main(model_dir, ids_path, out_path):
  torch.manual_seed(0)
  model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                           attn_implementation='eager')
  model.eval()
  ids = torch.from_numpy(np.load(ids_path).astype(np.int64))
  with torch.no_grad():
    logits = model(input_ids=ids).logits
  np.save(out_path, logits.float().numpy())


if __name__ == '__main__':
  main(*sys.argv[1:4])
