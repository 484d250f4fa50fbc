"""Data for the command line and for your own training loops.

Embedded data sets (nothing to download):
    load_digits()         scikit-learn's bundled 8×8 handwritten digits, (N, 1, 8, 8) float in [0, 1]
    pydoc_sentences()     English sentences from the help texts that ship inside Python (pydoc_data.topics)

Your own data:
    load_image_folder(path)   every image under a folder, grey or RGB, resized to a square
    load_text_file(path)      one sentence per non-empty line of a UTF-8 text file

Text goes through a `Tokenizer` (character or word level, with PAD/BOS/EOS/UNK) into
variable-length id tensors; `pad_collate` pads a batch and returns the key padding mask
(True = padding, the `masked_attention` / nn.MultiheadAttention convention). Problems with a
user's data raise `DataError` with a message that says what is wrong and where.
"""

from __future__ import annotations

import collections
import os
import random
import re
from dataclasses import dataclass, field

import torch

__all__ = ["DataError", "ImageData", "TextData", "Tokenizer", "load_data", "load_digits", "load_image_folder",
           "load_text_file", "make_text_data", "pad_collate", "pydoc_sentences", "split_indices"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm")


class DataError(ValueError):
    """A data source is missing, unreadable or unusable; the message says which and why."""


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """A seeded random split of range(n) into (train, validation) index lists.

    The validation part has round(n * val_fraction) items, at least 1 when val_fraction > 0
    and n >= 2; the training part is never empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1) if n >= 1 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


# ----------------------------------------------------------------------------- images

@dataclass
class ImageData:
    """Images as float tensors in [0, 1], shape (N, C, H, W), split into train and validation."""

    name: str
    train: torch.Tensor
    val: torch.Tensor
    labels_train: torch.Tensor | None = None
    labels_val: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.train.shape[1:])


def load_digits(val_fraction: float = 0.1, seed: int = 0) -> ImageData:
    """scikit-learn's bundled handwritten digits: 1797 images, (N, 1, 8, 8) float32 in [0, 1].

    The pixel values 0..16 are divided by 16. Labels (0..9) come along for plots; the VAE does
    not use them. The split is seeded and the same on every machine.
    """
    try:
        from sklearn.datasets import load_digits as _sk_load_digits
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise DataError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from exc
    bunch = _sk_load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32).div_(16.0).unsqueeze(1).contiguous()
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    train_idx, val_idx = split_indices(len(images), val_fraction, seed)
    return ImageData("digits", images[train_idx], images[val_idx], labels[train_idx], labels[val_idx])


def _find_images(root: str) -> list[str]:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.join(folder, name))
    return found


def load_image_folder(path: str, image_size: int = 32, channels: int = 1, val_fraction: float = 0.1,
                      seed: int = 0, limit: int | None = None) -> ImageData:
    """Every image file under `path` (searched recursively), as (N, channels, size, size) in [0, 1].

    Each image is converted to grey (channels=1) or RGB (channels=3), centre-cropped to a square
    and resized to image_size × image_size. `limit` keeps the first `limit` files (sorted by
    path). Raises DataError for a missing folder, a folder with no images, or a file that is
    not a readable image.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    if image_size < 4:
        raise ValueError(f"image_size must be >= 4, got {image_size!r}")
    if not os.path.isdir(path):
        raise DataError(f"image folder {path!r} does not exist" if not os.path.exists(path)
                        else f"{path!r} is not a folder")
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:  # pragma: no cover - matplotlib brings Pillow
        raise DataError("reading an image folder needs Pillow: pip install pillow") from exc
    files = _find_images(path)
    if not files:
        raise DataError(f"no images found under {path!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if limit is not None:
        files = files[:limit]
    mode = "L" if channels == 1 else "RGB"
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                img = img.convert(mode)
                w, h = img.size
                side = min(w, h)
                left, top = (w - side) // 2, (h - side) // 2
                img = img.crop((left, top, left + side, top + side)).resize(
                    (image_size, image_size), Image.Resampling.BILINEAR)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise DataError(f"cannot read image {f!r}: {exc}") from exc
        arrays.append(data.view(image_size, image_size, channels).permute(2, 0, 1))
    images = torch.stack(arrays).to(torch.float32).div_(255.0)
    if len(images) < 2:
        raise DataError(f"found only {len(images)} image under {path!r}; need at least 2 (train + validation)")
    train_idx, val_idx = split_indices(len(images), val_fraction, seed)
    name = os.path.basename(os.path.normpath(path)) or "images"
    return ImageData(name, images[train_idx], images[val_idx])


# ----------------------------------------------------------------------------- text

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"])")
_PLAIN_SENTENCE = re.compile(r"[A-Z][ -~]*[.!?]")
_EMPHASIS = re.compile(r"\*([^*\s][^*]*)\*")


def pydoc_sentences(min_words: int = 3, max_words: int = 32) -> list[str]:
    """English sentences from Python's own help texts (the pydoc_data.topics module).

    Prose paragraphs only (no headings, grammar rules, code or doctest blocks), split into
    sentences; ASCII sentences that start with a capital letter, end with . ! or ?, and have
    min_words..max_words words; reStructuredText *emphasis* stars removed; duplicates and
    "New in version ..." notes dropped. About 1,600 sentences of 3 to 32 words (the exact set
    follows the Python version's documentation), in a fixed order.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some minimal Python builds leave out pydoc_data
        raise DataError("this Python has no pydoc_data module, so the built-in 'text' corpus is missing; "
                        "pass a text file of sentences to --data instead") from exc
    sentences: dict[str, None] = {}
    for key in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[key]):
            lines = para.split("\n")
            if len(lines) > 1 and set(lines[-1].strip()) <= set("*=-~^"):
                continue  # a heading
            if "::=" in para or ">>>" in para:
                continue  # grammar or doctest
            first = lines[0]
            indent = len(first) - len(first.lstrip())
            body = first.strip()
            if body.startswith(("* ", "- ")):
                body = body[2:]
            elif indent >= 3 and any(len(ln) - len(ln.lstrip()) != indent for ln in lines if ln.strip()):
                continue  # a code block
            text = " ".join([body] + [ln.strip() for ln in lines[1:]])
            for s in _SENTENCE_SPLIT.split(text):
                s = _EMPHASIS.sub(r"\1", s.strip())
                if not _PLAIN_SENTENCE.fullmatch(s):
                    continue
                if s.startswith(("New in version", "Changed in version", "Deprecated since")):
                    continue
                if min_words <= len(s.split()) <= max_words:
                    sentences[s] = None
    return list(sentences)


def load_text_file(path: str, limit: int | None = None) -> list[str]:
    """The non-empty lines of a UTF-8 text file, stripped, one sentence each.

    Raises DataError for a missing or unreadable file, a file that is not UTF-8 text, or one
    with no non-empty line.
    """
    if not os.path.exists(path):
        raise DataError(f"text file {path!r} does not exist")
    if os.path.isdir(path):
        raise DataError(f"{path!r} is a folder, not a text file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path!r} is not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path!r}: {exc.strerror or exc}") from exc
    sentences = [ln for ln in lines if ln]
    if not sentences:
        raise DataError(f"{path!r} has no non-empty lines; expected one sentence per line")
    return sentences[:limit] if limit is not None else sentences


_WORD = re.compile(r"[A-Za-z_]\w*(?:[-'][A-Za-z]+)*|[0-9]+|[^\s\w]")


class Tokenizer:
    """Character- or word-level tokenizer with a fixed vocabulary.

    Ids 0..3 are the specials PAD, BOS, EOS, UNK; the rest are tokens sorted by falling
    frequency (then alphabetically), so a vocabulary built from the same text is the same
    everywhere. Word level lower-cases and splits words, numbers and single punctuation
    marks (identifiers such as __init__ and hyphenated words stay whole); decoding rejoins
    them with the usual spacing.
    """

    PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
    SPECIALS = (PAD, BOS, EOS, UNK)

    def __init__(self, level: str, tokens: list[str]):
        if level not in ("char", "word"):
            raise ValueError(f"level must be 'char' or 'word', got {level!r}")
        self.level = level
        self.itos = list(self.SPECIALS) + [t for t in tokens if t not in self.SPECIALS]
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, sentences: list[str], level: str = "char", min_freq: int = 1,
              max_size: int | None = None) -> "Tokenizer":
        """A vocabulary of the tokens of `sentences` seen at least min_freq times (at most
        max_size tokens besides the specials)."""
        probe = cls(level, [])
        counts = collections.Counter(t for s in sentences for t in probe.tokenize(s))
        tokens = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            tokens = tokens[:max_size]
        return cls(level, tokens)

    def __len__(self) -> int:
        return len(self.itos)

    def tokenize(self, text: str) -> list[str]:
        if self.level == "char":
            return list(text)
        return _WORD.findall(text.lower())

    def encode(self, text: str, max_len: int | None = None) -> list[int]:
        """[BOS] + token ids + [EOS]; with max_len, the tokens are cut so the whole is at most
        max_len ids long (EOS is kept)."""
        ids = [self.stoi.get(t, self.unk_id) for t in self.tokenize(text)]
        if max_len is not None:
            if max_len < 3:
                raise ValueError(f"max_len must be >= 3 (BOS, a token, EOS), got {max_len}")
            ids = ids[:max_len - 2]
        return [self.bos_id] + ids + [self.eos_id]

    def decode(self, ids) -> str:
        """Text of ids, stopping at the first EOS; PAD and BOS are skipped, UNK shows as ⟨unk⟩."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        tokens = []
        for i in ids:
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            tokens.append(self.itos[i] if 0 <= i < len(self.itos) else self.UNK)
        if self.level == "char":
            return "".join(tokens)
        text, in_quote, glue_next = "", False, True
        for t in tokens:
            closing = t == '"' and in_quote
            if not glue_next and not (t in ".,;:!?)]}" or closing):
                text += " "
            text += t
            glue_next = t in "([{" or (t == '"' and not in_quote)
            if t == '"':
                in_quote = not in_quote
        return text

    def state_dict(self) -> dict:
        return {"level": self.level, "itos": list(self.itos)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "Tokenizer":
        return cls(state["level"], state["itos"][len(cls.SPECIALS):])


@dataclass
class TextData:
    """Sentences as lists of token ids ([BOS] ... [EOS]), split into train and validation."""

    name: str
    tokenizer: Tokenizer
    max_len: int
    train: list[torch.Tensor]
    val: list[torch.Tensor]
    train_text: list[str] = field(default_factory=list)
    val_text: list[str] = field(default_factory=list)
    dropped: int = 0


def make_text_data(sentences: list[str], name: str = "text", level: str = "char", max_len: int = 128,
                   val_fraction: float = 0.1, seed: int = 0, min_freq: int | None = None,
                   tokenizer: Tokenizer | None = None) -> TextData:
    """Split `sentences`, build a tokenizer on the training part (unless one is given) and
    encode every sentence as an int64 tensor [BOS] ... [EOS].

    Sentences longer than max_len ids (with BOS and EOS) are dropped, not cut, so the model
    always sees real sentence ends; `TextData.dropped` counts them. min_freq: tokens seen
    fewer times become UNK (default 1 for characters, 2 for words).
    """
    if max_len < 3:
        raise ValueError(f"max_len must be >= 3 (BOS, a token, EOS), got {max_len}")
    if min_freq is None:
        min_freq = 1 if level == "char" else 2
    probe = tokenizer or Tokenizer(level, [])
    kept = [s for s in sentences if len(probe.tokenize(s)) + 2 <= max_len]
    if len(kept) < 2:
        raise DataError(f"{name}: {len(kept)} of {len(sentences)} sentences fit in max_len={max_len} tokens; "
                        f"need at least 2 (train + validation): raise --max-len")
    train_idx, val_idx = split_indices(len(kept), val_fraction, seed)
    if tokenizer is None:
        tokenizer = Tokenizer.build([kept[i] for i in train_idx], level, min_freq=min_freq)

    def part(idx):
        return ([torch.tensor(tokenizer.encode(kept[i]), dtype=torch.int64) for i in idx], [kept[i] for i in idx])

    (train, train_text), (val, val_text) = part(train_idx), part(val_idx)
    return TextData(name, tokenizer, max_len, train, val, train_text, val_text, len(sentences) - len(kept))


def pad_collate(batch: list[torch.Tensor], pad_id: int = Tokenizer.pad_id) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a list of 1-D id tensors to (B, T), T the longest; returns (tokens, key_padding_mask)
    with key_padding_mask[b, t] True where position t of sequence b is padding."""
    if not batch:
        raise ValueError("pad_collate: empty batch")
    lengths = torch.tensor([len(x) for x in batch])
    tokens = torch.full((len(batch), int(lengths.max())), pad_id, dtype=torch.int64)
    for i, x in enumerate(batch):
        tokens[i, :len(x)] = x
    mask = torch.arange(tokens.shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
    return tokens, mask


# ----------------------------------------------------------------------------- one entry point

def load_data(spec: str, kind: str, *, val_fraction: float = 0.1, seed: int = 0, level: str = "char",
              max_len: int = 128, image_size: int = 32, channels: int = 1, limit: int | None = None,
              tokenizer: Tokenizer | None = None):
    """The data named by the command line's --data: 'digits', 'text', or a path.

    kind: 'image' or 'text', what the model needs. A folder is read as images, a file as text
    (one sentence per line). Returns ImageData or TextData; raises DataError when the source
    is missing, unreadable, or of the wrong kind for the model.
    """
    if spec == "digits":
        if kind != "image":
            raise DataError("'digits' is image data; the transformer model needs text (--data text or a text file)")
        data = load_digits(val_fraction, seed)
        if limit is not None:
            data.train, data.labels_train = data.train[:limit], data.labels_train[:limit]
        return data
    if spec == "text":
        if kind != "text":
            raise DataError("'text' is text data; the conv and mlp models need images (--data digits or a folder)")
        sentences = pydoc_sentences()
        return _text(sentences, "pydoc-topics", level, max_len, val_fraction, seed, limit, tokenizer)
    if not os.path.exists(spec):
        raise DataError(f"--data {spec!r}: no such file or folder (use 'digits', 'text', a folder of images "
                        f"or a text file with one sentence per line)")
    if os.path.isdir(spec):
        if kind != "image":
            raise DataError(f"--data {spec!r} is a folder (read as images); the transformer model needs a text file")
        return load_image_folder(spec, image_size, channels, val_fraction, seed, limit)
    if kind != "text":
        raise DataError(f"--data {spec!r} is a file (read as text, one sentence per line); the conv and mlp "
                        f"models need a folder of images")
    sentences = load_text_file(spec)
    name = os.path.splitext(os.path.basename(spec))[0] or "text"
    return _text(sentences, name, level, max_len, val_fraction, seed, limit, tokenizer)


def _text(sentences, name, level, max_len, val_fraction, seed, limit, tokenizer) -> TextData:
    data = make_text_data(sentences, name, level, max_len, val_fraction, seed, tokenizer=tokenizer)
    if limit is not None:
        data.train, data.train_text = data.train[:limit], data.train_text[:limit]
    return data
