"""Frozen visual Unicode embeddings (Bochkov 2025, "Emergent Semantics Beyond Token Embeddings:
Transformer LMs with Frozen Visual Unicode Representations"; AVBochkov/Embeddings): every
token's input embedding is a fixed vector computed from the glyphs of its characters, never
trained (`model.input_embedding='glyph'`, models/token_lm.py).

Construction (`glyph_table`), deterministic for a font file and Pillow version:
  1. the token's text: its bytes decoded as UTF-8 (a BPE token, a byte < 0x80 of the byte
     vocabulary); whitespace drawn with visible stand-ins, since a blank bitmap would make
     every whitespace token the same vector: space '␣' (U+2423), newline '↵' (U+21B5), tab
     '⇥' (U+21E5), carriage return '⏎' (U+23CE);
  2. a bitmap: each character rendered with the font (default: DejaVu Sans, the copy
     matplotlib ships; `model.glyph_font` names another .ttf/.otf) in its own square cell of
     `model.glyph_size` pixels (grey levels in [0, 1]), the cells side by side; a token of more
     than `model.glyph_chars` characters is squeezed horizontally into that many cells
     (bilinear), so long tokens keep their shape instead of being cut;
  3. PCA over the rendered tokens of the vocabulary to d = model.d_model dimensions (the
     paper's "rendered glyph bitmaps -> PCA projection -> L2 normalization"; components signed
     so their largest coefficient is positive; fewer tokens than d leave the last dimensions at
     0), then each row L2-normalized (norm 1).

Fallback (documented, counted in `stats`): a token with no renderable text -- pad / bos / eos
and the padding ids, a byte >= 0x80 of the byte vocabulary or a BPE token whose bytes are not
complete UTF-8 (a fragment of a character), a control character without a stand-in, or a
character the font has no glyph for (or draws without ink) -- gets a fixed random unit vector,
N(0, I_d) seeded by (`model.glyph_seed`, token id) and L2-normalized: distinct, fixed and
non-semantic like the rendered rows. Tokens whose bitmaps coincide (homoglyphs) share their
vector, as the method implies (`stats['duplicate_rows']`).
"""
from __future__ import annotations

import os

import numpy as np

STANDINS = {' ': '\u2423', '\n': '\u21b5', '\t': '\u21e5', '\r': '\u23ce'}


def default_font() -> str:
  """DejaVu Sans from matplotlib's data directory (no download)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError('model.glyph_font is empty and matplotlib (whose DejaVu Sans is the default '
                     'font) is not installed: set model.glyph_font to a .ttf file') from e
  return os.path.join(matplotlib.get_data_path(), 'fonts', 'ttf', 'DejaVuSans.ttf')


def resolve_font(path: str) -> str:
  """`model.glyph_font` ('' = DejaVu Sans) as a readable font file, else a ValueError naming
  the key."""
  p = path or default_font()
  if not os.path.isfile(p):
    raise ValueError(f'model.glyph_font={path!r}: no font file {p!r} (a .ttf / .otf file; '
                     "'' is the DejaVu Sans matplotlib ships)")
  try:
    from PIL import ImageFont  # pylint: disable=import-outside-toplevel
    ImageFont.truetype(p, 12)
  except OSError as e:
    raise ValueError(f'model.glyph_font={path!r}: {p!r} is not a font Pillow can read ({e})'
                     ) from e
  return p


def token_texts(token_bytes: list[bytes | None]) -> list[str | None]:
  """The text each token shows (None: no text), from its bytes (None: a special / padding)."""
  out = []
  for b in token_bytes:
    if not b:
      out.append(None)
      continue
    try:
      out.append(b.decode('utf-8'))
    except UnicodeDecodeError:  # a fragment of a character
      out.append(None)
  return out


class _Renderer:

  def __init__(self, font_path: str, size: int, max_chars: int):
    from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel
    from fontTools.ttLib import TTFont  # pylint: disable=import-outside-toplevel
    self.Image, self.ImageDraw = Image, ImageDraw
    self.size, self.max_chars = size, max_chars
    self.font = ImageFont.truetype(font_path, max(4, int(round(size * 0.8))))
    self.cmap = set(TTFont(font_path, fontNumber=0, lazy=True).getBestCmap())
    self._cells: dict[str, np.ndarray | None] = {}

  def cell(self, ch: str) -> np.ndarray | None:
    """float32 [size, size] ink of one character (stand-ins applied), None if not drawable."""
    if ch in self._cells:
      return self._cells[ch]
    shown = STANDINS.get(ch, ch)
    out = None
    if ord(shown) in self.cmap and not (shown.isspace() or ord(shown) < 0x20 or
                                        0x7f <= ord(shown) < 0xa0):
      img = self.Image.new('L', (self.size, self.size), 0)
      draw = self.ImageDraw.Draw(img)
      draw.text((self.size / 2, self.size / 2), shown, fill=255, font=self.font, anchor='mm')
      a = np.asarray(img, np.float32) / 255.0
      out = a if a.any() else None
    self._cells[ch] = out
    return out

  def token(self, text: str) -> np.ndarray | None:
    """float32 [size, size * max_chars]: the characters' cells side by side (squeezed to
    max_chars cells when longer), None if a character is not drawable."""
    cells = [self.cell(ch) for ch in text]
    if not cells or any(c is None for c in cells):
      return None
    row = np.concatenate(cells, axis=1)
    width = self.size * self.max_chars
    if row.shape[1] > width:
      img = self.Image.fromarray(np.round(row * 255).astype(np.uint8))
      row = np.asarray(img.resize((width, self.size), self.Image.BILINEAR), np.float32) / 255.0
    out = np.zeros((self.size, width), np.float32)
    out[:, :row.shape[1]] = row
    return out


def _principal_axes(xc: np.ndarray, k: int) -> np.ndarray:
  """The top-k principal axes [P, k] of centred rows xc [N, P], by decreasing variance (exact:
  from the N x N Gram matrix when N <= P, else the P x P covariance)."""
  n, p = xc.shape
  if k == 0:
    return np.zeros((p, 0))
  if n <= p:
    w, u = np.linalg.eigh(xc @ xc.T)
    w, u = w[::-1][:k], u[:, ::-1][:, :k]
    return xc.T @ u / np.sqrt(np.maximum(w, 1e-12))
  return np.linalg.eigh(xc.T @ xc)[1][:, ::-1][:, :k]


def glyph_table(token_bytes: list[bytes | None], d: int, font: str = '', size: int = 16,
                max_chars: int = 8, seed: int = 0) -> tuple[np.ndarray, dict]:
  """(float32 [V, d] table of unit rows, stats) for tokens given by their bytes (None for
  specials / padding ids); see the module doc."""
  if size < 4 or max_chars < 1 or d < 1:
    raise ValueError(f'model.glyph_size={size} (>= 4) / model.glyph_chars={max_chars} (>= 1) / '
                     f'd_model={d} out of range')
  r = _Renderer(resolve_font(font), int(size), int(max_chars))
  texts = token_texts(token_bytes)
  rows, ids = [], []
  for i, t in enumerate(texts):
    bmp = r.token(t) if t else None
    if bmp is not None:
      rows.append(bmp.reshape(-1))
      ids.append(i)
  v = len(token_bytes)
  table = np.zeros((v, d), np.float64)
  if rows:
    x = np.stack(rows).astype(np.float64)
    xc = x - x.mean(0)
    k = max(int(min(d, len(rows) - 1, x.shape[1])), 0)
    comp = _principal_axes(xc, k)                        # [pixels, k], by variance
    flip = np.sign(comp[np.argmax(np.abs(comp), axis=0), np.arange(comp.shape[1])])
    comp = comp * np.where(flip == 0, 1.0, flip)
    proj = xc.astype(np.float64) @ comp
    table[ids, :proj.shape[1]] = proj
  fallback = [i for i in range(v) if i not in set(ids)]
  for i in fallback:
    table[i] = np.random.default_rng([int(seed), i]).standard_normal(d)
  norms = np.linalg.norm(table, axis=1, keepdims=True)
  zero = norms[:, 0] < 1e-12
  for i in np.flatnonzero(zero):  # a rendered token at the mean (one-token vocabularies)
    table[i] = np.random.default_rng([int(seed), int(i)]).standard_normal(d)
  table /= np.linalg.norm(table, axis=1, keepdims=True)
  rendered = table[ids]
  _, counts = np.unique(np.round(rendered, 6), axis=0, return_counts=True) if ids else (None, [])
  stats = {'glyph_rendered_tokens': len(ids), 'glyph_fallback_tokens': len(fallback),
           'glyph_duplicate_rows': int(sum(c - 1 for c in counts))}
  return table.astype(np.float32), stats


def encoder_token_bytes(encoder) -> list[bytes | None]:
  """The bytes each id of a `data.encoders` encoder stands for (None: specials and padding):
  ByteEncoder ids 3..258 one byte each; a BPEEncoder's tokens through the byte-level alphabet
  (added non-special tokens as their UTF-8 text)."""
  from data import canonical, encoders  # pylint: disable=import-outside-toplevel
  v = encoder.vocab_size
  out: list[bytes | None] = [None] * v
  if isinstance(encoder, encoders.ByteEncoder):
    for b in range(256):
      out[b + encoders.BYTE_OFFSET] = bytes([b])
    return out
  tok = encoder.tokenizer
  alphabet = canonical.byte_alphabet()
  added = {i: t for i, t in tok.get_added_tokens_decoder().items()}
  specials = {encoder.pad_id, encoder.bos_id, encoder.eos_id}
  for i in range(min(encoder.true_vocab_size, v)):
    if i in specials or (i in added and added[i].special):
      continue
    piece = tok.id_to_token(i)
    if piece is None:
      continue
    if i in added:
      out[i] = added[i].content.encode('utf-8')
    elif all(c in alphabet for c in piece):
      out[i] = bytes(alphabet[c] for c in piece)
    else:
      out[i] = piece.encode('utf-8')
  return out
