"""Captions for text conditioning: made from class labels (MNIST, Fashion-MNIST) with templates
and paraphrases, or read beside the images of a folder.

A `CaptionSet` is the captions a training stream may pair with each of its labels y: for a
labelled set every (template, class) caption of the training templates, for a folder the one
caption of image i (y = i). Some templates (`HELD_OUT`) are never trained on, so that samples
from them measure whether the text model generalises beyond the sentences it saw.

Image folders follow the Hugging Face ImageFolder convention: a `metadata.jsonl` at the folder's
root with one JSON object per line, `{"file_name": "<path relative to the root>", "text": ...}`;
or, without one, a `.txt` file beside each image (`cat.png` -> `cat.txt`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from difflab.errors import ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Fashion-MNIST's ten classes, each with a paraphrase: "a photo of a sneaker", "an ankle boot"
FASHION_WORDS = (
    ("t-shirt", "top"),
    ("pair of trousers", "pair of pants"),
    ("pullover", "sweater"),
    ("dress", "frock"),
    ("coat", "jacket"),
    ("sandal", "summer shoe"),
    ("shirt", "blouse"),
    ("sneaker", "trainer"),
    ("bag", "handbag"),
    ("ankle boot", "boot"),
)

# {word}: the class word ("seven"), {digit}: its numeral (MNIST only), {alt}: a paraphrase
# (Fashion), {a}: "a" or "an" before the word that follows it ("an eight", "an 8").
MNIST_TEMPLATES = {
    "seen": (
        "a handwritten {word}",
        "the digit {digit}, written by hand",
        "{word}",
        "the number {word}",
        "{a} {digit}",
        "a picture of the digit {word}",
        "handwritten digit {digit}",
        "an image of a handwritten {digit}",
    ),
    "held_out": (
        "a scan of the number {digit}",
        "someone wrote the digit {word}",
        "a drawing of {a} {word}",
        "the handwritten numeral {digit}",
    ),
}
FASHION_TEMPLATES = {
    "seen": (
        "{a} {word}",
        "a photo of {a} {word}",
        "{a} {alt}",
        "a picture of {a} {alt}",
        "a grey image of {a} {word}",
        "{word}",
        "a product photo of {a} {word}",
        "a small photo of {a} {alt}",
    ),
    "held_out": (
        "a black and white photo of {a} {word}",
        "an image showing {a} {alt}",
        "a low resolution picture of {a} {word}",
        "a catalogue photo of {a} {alt}",
    ),
}


class CaptionError(ConfigError):
    """Captions missing or malformed; the message names the file and the fix."""


def _article(text: str) -> str:
    return "an" if text[0] in "aeiou" else "a"


def label_caption(dataset: str, template: str, k: int) -> str:
    """The caption of class k of `dataset` (mnist or fashion) in `template`."""
    if dataset == "mnist":  # {a} before a digit reads as its word: "an 8"
        return template.format(word=DIGIT_WORDS[k], digit=k, a=_article(DIGIT_WORDS[k]))
    word, alt = FASHION_WORDS[k]
    # {a} stands before {word} or {alt}; which of them follows decides "a" or "an"
    head = template.split("{a}", 1)[1][:7] if "{a}" in template else ""
    noun = alt if "{alt}" in head else word
    return template.format(word=word, alt=alt, a=_article(noun))


def templates(dataset: str, which: str = "seen") -> tuple[str, ...]:
    """The `which` ("seen" or "held_out") templates of mnist or fashion."""
    if dataset not in ("mnist", "fashion"):
        raise CaptionError(f"captions from labels exist for mnist and fashion, not {dataset!r}")
    return (MNIST_TEMPLATES if dataset == "mnist" else FASHION_TEMPLATES)[which]


def prompts_for(dataset: str, classes: Tensor | list[int], which: str = "seen", template=0):
    """Captions of `classes` in template number `template` of the `which` set (or, with
    template=None, cycling through them: example i gets template i // num_classes)."""
    found = templates(dataset, which)
    out = []
    for i, k in enumerate(int(k) for k in classes):
        j = template if template is not None else (i // 10) % len(found)
        out.append(label_caption(dataset, found[j], k))
    return out


@dataclass
class CaptionSet:
    """The captions a stream's labels y may take.

    captions: every distinct caption, in order (their embeddings are computed once).
    choices: (Y, M) long: row y lists the caption indices y may take (padded with repeats);
    counts: (Y,) how many of row y are real.
    """

    captions: list[str]
    choices: Tensor
    counts: Tensor

    def draw(self, y: Tensor, generator: torch.Generator) -> Tensor:
        """Caption indices (B,) for labels y (B,): uniform over each y's choices."""
        r = torch.rand(y.shape, generator=generator)
        pick = (r * self.counts[y]).long().clamp(max=self.choices.shape[1] - 1)
        return self.choices[y, pick]


def label_captions(dataset: str, num_classes: int) -> CaptionSet:
    """Every seen template for every class: caption index = template * num_classes + k."""
    found = templates(dataset, "seen")
    captions = [label_caption(dataset, t, k) for t in found for k in range(num_classes)]
    choices = torch.arange(len(found))[None, :] * num_classes + torch.arange(num_classes)[:, None]
    return CaptionSet(captions, choices, torch.full((num_classes,), len(found)))


def read_folder_captions(root: Path, paths: list[Path]) -> list[str]:
    """One caption per image of a folder, from root/metadata.jsonl or a .txt beside each image.

    Raises CaptionError naming the image whose caption is missing, or the metadata line that
    names a missing image or has no `text`.
    """
    metadata = root / "metadata.jsonl"
    if not metadata.is_file():
        captions = []
        for path in paths:
            txt = path.with_suffix(".txt")
            if not txt.is_file():
                raise CaptionError(
                    f"no caption for {path}: write {txt.name} beside it, or list every image "
                    f'in {metadata} as {{"file_name": ..., "text": ...}}'
                )
            captions.append(txt.read_text(encoding="utf-8").strip())
        return captions
    by_name = {}
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise CaptionError(f"{metadata} line {number} is not JSON: {e}") from None
        if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
            raise CaptionError(
                f'{metadata} line {number} needs "file_name" and "text" (the Hugging Face '
                f"ImageFolder columns); got {line.strip()[:80]}"
            )
        image = (root / row["file_name"]).resolve()
        if not image.is_file():
            raise CaptionError(f"{metadata} line {number} names {row['file_name']}, not in {root}")
        by_name[image] = str(row["text"])
    missing = [p for p in paths if p.resolve() not in by_name]
    if missing:
        raise CaptionError(
            f"{len(missing)} image(s) have no caption in {metadata}, e.g. {missing[0]}; add a "
            'line {"file_name": ..., "text": ...} for each'
        )
    return [by_name[p.resolve()] for p in paths]


class CaptionedImages(Dataset):
    """A folder's images with their captions: item i -> (x, i), so the label is the caption's
    index (`num_classes` counts captions, which makes the stream yield them)."""

    def __init__(self, images, captions: list[str]):
        self.images, self.captions = images, captions
        self.shape, self.num_classes, self.class_names = images.shape, len(captions), ()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i][0], i

    def verify(self) -> int:
        return self.images.verify()

    def caption_set(self) -> CaptionSet:
        n = len(self.captions)
        return CaptionSet(list(self.captions), torch.arange(n)[:, None], torch.ones(n))


def captioned(name: str, dataset, class_names=(), root=".") -> tuple[Dataset, CaptionSet]:
    """A data set and the captions of its labels: mnist and fashion from their templates, an
    image folder from its metadata.jsonl or .txt files (its labels become caption indices)."""
    if name in ("mnist", "fashion"):
        return dataset, label_captions(name, len(class_names) or 10)
    if name != "imagefolder":
        raise CaptionError(
            f"data.text_conditional needs captions: mnist and fashion make them from labels, "
            f"imagefolder reads metadata.jsonl or .txt files; {name} has none"
        )
    root = Path(root).expanduser().absolute()
    folder = CaptionedImages(dataset, read_folder_captions(root, dataset.paths))
    return folder, folder.caption_set()


def class_names_of(dataset: str) -> tuple[str, ...]:
    """The class names of a data set captioned from labels ("" for others)."""
    if dataset == "mnist":
        return tuple(str(k) for k in range(10))
    return tuple(w for w, _ in FASHION_WORDS) if dataset == "fashion" else ()
