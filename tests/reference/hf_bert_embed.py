"""Runs in the reference environment (.venv-ref):
  python hf_bert_embed.py MODEL_DIR IDS.npy MASK.npy OUT.npy
sentence embeddings as sentence-transformers makes them for all-MiniLM-L6-v2: transformers'
BertModel (float32), mean over the attention mask, L2-normalized; saved as float32 [B, D]."""
import sys

import numpy as np
import torch
from transformers import BertModel


def main(model_dir, ids_path, mask_path, out_path):
  model = BertModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation='eager')
  model.eval()
  ids = torch.from_numpy(np.load(ids_path).astype(np.int64))
  mask = torch.from_numpy(np.load(mask_path).astype(np.int64))
  with torch.no_grad():
    h = model(input_ids=ids, attention_mask=mask).last_hidden_state
  m = mask.unsqueeze(-1).float()
  mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
  out = torch.nn.functional.normalize(mean, p=2, dim=1)
  np.save(out_path, out.numpy())


if __name__ == '__main__':
  main(*sys.argv[1:5])
