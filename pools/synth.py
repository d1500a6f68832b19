"""A synthetic pool that behaves like CommonPool, small enough for a CPU.

    python -m pools.synth --out DIR [--samples N] [--seed S]

Images are drawn with Pillow from a fixed set of visual concepts (colour x shape, on textured
backgrounds) that a tiny CLIP learns in minutes. Captions carry CommonPool's kinds of noise,
each kind a known fraction (`CaptionMix`): matching English captions with and without an
ImageNet-21k noun, English captions of the wrong concept, non-English captions, junk, and
off-target samples: images of none of the concepts (landscapes, rooms, documents, textures,
like the many CommonPool images unrelated to ImageNet) with English captions that describe
them, which only the image-based filter's clusters can tell apart.
Image sizes include small images and extreme aspect ratios, rendered small or stretched so
that the size filters have something real to remove; a fraction of URLs "fail to download"
and are missing from the shards, as with img2dataset.

Written (see `pools.format` for the format)::

    <out>/metadata/<hex>.parquet      CommonPool columns; CLIP scores empty (null) until
                                      `pipeline.score` fills them, unless --random-scores
    <out>/metadata/<hex>.npz          only with --random-scores (drawn file by file, so memory
                                      follows --rows-per-file, not --samples)
    <out>/shards/{:08d}.tar|.parquet|_stats.json   webdataset shards as img2dataset writes them
    <out>/eval/                       held-out eval set of the same concepts (DataComp's wds
                                      layout: test/{0..3}.tar, test/nshards.txt, classnames.txt,
                                      zeroshot_classification_templates.txt)
    <out>/ground_truth.parquet        each sample's true noise label (never in metadata/)
    <out>/pool.json                   parameters and the generated composition

Deterministic for a seed: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import shutil
import sys
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw
from tqdm import tqdm

from pools.files import atomic_path, write_json_atomic
from pools.scales import get_scale
from pools.format import (METADATA_SCHEMA, NPZ_KEYS, SCORE_COLUMNS, SHARD_FORMAT,
                          SHARD_PARQUET_FORMAT, SHARD_STATS_FORMAT)

# --- the visual concepts ----------------------------------------------------------------------
# Colour and shape names were picked so that none of them has a first WordNet synset in the
# ImageNet-21k list: whether a caption passes DataComp's text filter then depends only on the
# object nouns below, which all do.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "lime": (60, 210, 40),
    "navy": (20, 30, 140),
    "cyan": (30, 210, 220),
    "magenta": (210, 40, 200),
    "amber": (250, 185, 10),
}
SHAPES = ("square", "star", "heart", "moon", "plus", "arrow")
BACKGROUNDS = ("plain", "striped", "dotted", "checked")
IMAGENET_NOUNS = ("shirt", "balloon", "wall", "flag", "tile", "laptop", "paper", "plate")

CONCEPTS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)


NO_CONCEPT = -1  # the concept of an off-target image


def concept_name(concept: int) -> str:
    if concept == NO_CONCEPT:
        return "none"
    colour, shape = CONCEPTS[concept]
    return f"{colour} {shape}"


# --- captions ---------------------------------------------------------------------------------
PLAIN_TEMPLATES = (
    "a {c} {s}", "{c} {s} icon", "simple {c} {s} clipart", "a {c} {s} on a striped background",
    "vector drawing of a {c} {s}", "minimal {c} {s} pattern", "a photo of a {c} {s}",
    "{c} {s} logo, flat design", "Bold {c} {s} symbol", "digital art: a {c} {s}, centered",
)
ENTITY_TEMPLATES = (
    "a {c} {s} printed on a shirt", "{c} {s} balloon", "a {c} {s} painted on a wall",
    "a flag with a {c} {s}", "{c} {s} sticker on a laptop", "a {c} {s} drawn on paper",
    "{c} {s} pattern on a tile", "a plate with a {c} {s}",
    # Punctuation is not stripped by the reference, so "shirt." is not a WordNet hit.
    "my new {c} {s} shirt.",
)
# Translations for the non-English captions that describe the concept.
FOREIGN = {
    "de": ("{c} {s} auf weißem Hintergrund, ein schönes Motiv für Ihr Zuhause",
           {"red": "roter", "lime": "hellgrüner", "navy": "dunkelblauer", "cyan": "türkisfarbener",
            "magenta": "magentafarbener", "amber": "gelber"},
           {"square": "Quadrat", "star": "Stern", "heart": "Herz", "moon": "Mond", "plus": "Kreuz",
            "arrow": "Pfeil"}),
    "fr": ("un {s} {c} sur fond blanc, parfait pour votre décoration",
           {"red": "rouge", "lime": "vert clair", "navy": "bleu marine", "cyan": "cyan",
            "magenta": "magenta", "amber": "jaune"},
           {"square": "carré", "star": "étoile", "heart": "cœur", "moon": "croissant de lune",
            "plus": "signe plus", "arrow": "flèche"}),
    "es": ("un {s} {c} dibujado sobre un fondo claro, ideal para camisetas y carteles",
           {"red": "rojo", "lime": "verde lima", "navy": "azul marino", "cyan": "cian",
            "magenta": "magenta", "amber": "amarillo"},
           {"square": "cuadrado", "star": "estrella", "heart": "corazón", "moon": "luna",
            "plus": "signo más", "arrow": "flecha"}),
    "it": ("un {s} {c} disegnato a mano, stampa di alta qualità",
           {"red": "rosso", "lime": "verde lime", "navy": "blu scuro", "cyan": "ciano",
            "magenta": "magenta", "amber": "giallo"},
           {"square": "quadrato", "star": "stella", "heart": "cuore", "moon": "luna",
            "plus": "segno più", "arrow": "freccia"}),
    "pt": ("um {s} {c} desenhado, com fundo neutro e cores vivas",
           {"red": "vermelho", "lime": "verde-limão", "navy": "azul-marinho", "cyan": "ciano",
            "magenta": "magenta", "amber": "amarelo"},
           {"square": "quadrado", "star": "estrela", "heart": "coração", "moon": "lua",
            "plus": "sinal de mais", "arrow": "seta"}),
    "nl": ("een {c} {s} op een lichte achtergrond, mooi voor in huis",
           {"red": "rode", "lime": "lichtgroene", "navy": "donkerblauwe", "cyan": "cyaan",
            "magenta": "magenta", "amber": "gele"},
           {"square": "vierkant", "star": "ster", "heart": "hart", "moon": "maan", "plus": "plusteken",
            "arrow": "pijl"}),
}
# Real sentences in languages whose captions do not describe the image (shop and blog text).
FOREIGN_GENERIC = {
    "ru": ("Бесплатная доставка по всей России при заказе от 3000 рублей",
           "Новая коллекция уже в продаже, успейте купить со скидкой"),
    "ja": ("送料無料でお届けします。ご注文はお早めに。", "新しいデザインのポスターが入荷しました"),
    "zh": ("全场包邮，欢迎选购我们的新款产品", "这是我们店里最受欢迎的设计之一"),
    "pl": ("Darmowa dostawa przy zamówieniu powyżej 100 złotych", "Nowa kolekcja już dostępna w naszym sklepie"),
}
# Off-target images: scenes that are none of the concepts, each with captions describing it.
# No caption names a concept's colour or shape.
OFF_TARGET_SCENES: dict[str, tuple[str, ...]] = {
    "landscape": ("sunset over the hills, landscape photography", "a quiet beach at dusk",
                  "mountain view from the trail, summer holiday", "wide field under an evening sky"),
    "room": ("a cozy living room interior with a sofa", "modern kitchen design ideas",
             "bookshelves in a small study room", "hotel room with a view"),
    "document": ("scanned page of an old contract", "screenshot of a spreadsheet with sales figures",
                 "printable worksheet for kids, page 2", "lecture notes, chapter one"),
    "texture": ("close-up of weathered concrete texture", "seamless noise texture for backgrounds",
                "grainy film texture overlay", "macro photo of sand grains"),
}
JUNK_CAPTIONS = (
    "IMG_{n}.jpg", "DSC{n}.JPG", "", "image", "untitled", "⭐🔥✨", "😍😍😍",
    "https://shop.example.com/item/{n}", "Buy now\n\nFree shipping!", "{n}x{m}",
    "{s}", "{c}\u00a0{s}\u00a0art",  # no-break spaces: str.split() splits them, fastText does not
    "new\n", "  ", "photo {n}",
)


@dataclass(frozen=True, kw_only=True)
class CaptionMix:
    """Fraction of each caption kind; the fractions must sum to 1."""

    match_entity: float = 0.21  # matching English, names an ImageNet-21k noun
    match_plain: float = 0.18  # matching English, no ImageNet-21k noun
    mismatch: float = 0.19  # English, describes a different concept
    non_english: float = 0.12  # other languages (some describe the concept, some do not)
    junk: float = 0.18  # file names, empty, one word, emoji, URLs, newlines
    off_target: float = 0.12  # the image shows no concept; an English caption describes it
    null_fraction_of_junk: float = 0.05  # junk rows whose text is null (None) in the parquet

    def __post_init__(self) -> None:
        total = sum(self.fractions().values())
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"caption kind fractions sum to {total}, not 1")

    def fractions(self) -> dict[str, float]:
        return {"match_entity": self.match_entity, "match_plain": self.match_plain,
                "mismatch": self.mismatch, "non_english": self.non_english, "junk": self.junk,
                "off_target": self.off_target}


@dataclass(frozen=True, kw_only=True)
class SizeMix:
    """Fractions of original image sizes; the rest are ordinary web images."""

    small: float = 0.12  # shorter side < 200 px: the basic filter removes these
    extreme_aspect: float = 0.08  # aspect ratio > 3: the basic filter removes these
    boundary: float = 0.02  # exactly 200 px or exactly 3.0 aspect: kept by the basic filter


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    samples: int = get_scale("tiny").pool_samples
    seed: int = 0
    rows_per_file: int = 5_000  # rows per metadata parquet
    shard_size: int = 1_000  # input rows per webdataset shard (img2dataset: 10,000)
    image_px: int = 64  # longer side of the stored image
    download_failure: float = 0.07  # rows whose URL "fails"; missing from the shards
    eval_per_class: int = 20
    images: bool = True  # False: metadata only (no shards, no eval set)
    random_scores: bool = False  # fill scores + npz with random self-consistent values
    duplicates: float = 0.0  # rows in planted near-duplicate groups of 2-5 (plant_duplicate_groups)
    eval_copies: int = 0  # rows whose image is a near-copy of an eval-set image (plant_eval_copies)
    url_base: str = "https://images.synthetic-pool.invalid"
    captions: CaptionMix = field(default_factory=CaptionMix)
    sizes: SizeMix = field(default_factory=SizeMix)


# --- drawing ----------------------------------------------------------------------------------
def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Polygon of `shape` centred at (cx, cy) with radius r, rotated by `angle` radians."""
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        pts = [(x * 0.8, y * 0.8) for x, y in pts]
    elif shape == "star":
        pts = [((1.0 if i % 2 == 0 else 0.45) * math.sin(i * math.pi / 5),
                -(1.0 if i % 2 == 0 else 0.45) * math.cos(i * math.pi / 5)) for i in range(10)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        xs = 16 * np.sin(ts) ** 3
        ys = -(13 * np.cos(ts) - 5 * np.cos(2 * ts) - 2 * np.cos(3 * ts) - np.cos(4 * ts))
        pts = list(zip(xs / 17, ys / 17))
    elif shape == "moon":
        outer = [(math.cos(t), math.sin(t)) for t in np.linspace(math.pi / 2, 3 * math.pi / 2, 20)]
        inner = [(0.45 * math.cos(t) - 0.1, math.sin(t)) for t in np.linspace(3 * math.pi / 2, math.pi / 2, 20)]
        pts = outer + inner
    elif shape == "plus":
        a, b = 0.3, 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a), (a, b), (-a, b), (-a, a),
               (-b, a), (-b, -a), (-a, -a)]
    elif shape == "arrow":
        pts = [(-0.9, -0.25), (0.2, -0.25), (0.2, -0.65), (0.95, 0), (0.2, 0.65), (0.2, 0.25),
               (-0.9, 0.25)]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def render_concept(concept: int, rng: np.random.Generator, *, width: int = 64,
                   height: int = 64) -> Image.Image:
    """Draw one image of `concept` (colour x shape) on a random textured background."""
    colour_name, shape = CONCEPTS[concept]
    base = rng.integers(150, 250)
    tint = rng.integers(-20, 21, size=3)
    bg = tuple(int(np.clip(base + t, 0, 255)) for t in tint)
    img = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(img)
    texture = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    ink = tuple(int(np.clip(v - rng.integers(40, 90), 0, 255)) for v in bg)
    step = max(4, int(min(width, height) / rng.integers(4, 9)))
    if texture == "striped":
        for x in range(-height, width, step):
            draw.line([(x, 0), (x + height, height)], fill=ink, width=max(1, step // 4))
    elif texture == "dotted":
        for x in range(step // 2, width, step):
            for y in range(step // 2, height, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=ink)
    elif texture == "checked":
        for i, x in enumerate(range(0, width, step)):
            for j, y in enumerate(range(0, height, step)):
                if (i + j) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=ink)
    side = min(width, height)
    r = side * rng.uniform(0.28, 0.42)
    cx = width / 2 + rng.uniform(-0.12, 0.12) * side
    cy = height / 2 + rng.uniform(-0.12, 0.12) * side
    colour = np.array(COLOURS[colour_name]) + rng.integers(-15, 16, size=3)
    fill = tuple(int(v) for v in np.clip(colour, 0, 255))
    draw.polygon(_shape_polygon(shape, cx, cy, r, rng.uniform(-0.35, 0.35)), fill=fill)
    return img


def render_off_target(scene: str, rng: np.random.Generator, *, width: int = 64,
                      height: int = 64) -> Image.Image:
    """Draw an image of none of the concepts: a landscape, a room, a document page or a texture."""
    if scene == "texture":
        grey = rng.integers(60, 200)
        noise = rng.normal(grey, rng.uniform(15, 50), size=(height, width, 1)) + rng.integers(-25, 26, size=3)
        return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")
    img = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(img)
    if scene == "landscape":
        sky, ground = rng.integers(60, 255, size=3), rng.integers(20, 160, size=3)
        horizon = int(height * rng.uniform(0.45, 0.7))
        for y in range(height):
            base = sky if y < horizon else ground
            shade = 1.0 - 0.5 * (y / height if y < horizon else (y - horizon) / max(1, height - horizon))
            draw.line([(0, y), (width, y)], fill=tuple(int(v * shade) for v in base))
        r = min(width, height) * rng.uniform(0.06, 0.12)
        cx, cy = width * rng.uniform(0.15, 0.85), horizon * rng.uniform(0.2, 0.7)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(250, 240, 200))
    elif scene == "room":
        draw.rectangle([0, 0, width, height], fill=tuple(int(v) for v in rng.integers(120, 230, size=3)))
        floor = int(height * rng.uniform(0.6, 0.8))
        draw.rectangle([0, floor, width, height], fill=tuple(int(v) for v in rng.integers(60, 140, size=3)))
        for _ in range(int(rng.integers(2, 5))):
            x0, y0 = rng.uniform(0, 0.8) * width, rng.uniform(0.2, 0.7) * height
            w, h = rng.uniform(0.1, 0.4) * width, rng.uniform(0.1, 0.35) * height
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(30, 200, size=3)))
    elif scene == "document":
        paper = int(rng.integers(225, 256))
        draw.rectangle([0, 0, width, height], fill=(paper, paper, paper - int(rng.integers(0, 20))))
        step = max(3, height // int(rng.integers(8, 14)))
        for y in range(step, height - step, step):
            length = width * rng.uniform(0.5, 0.9)
            draw.line([(width * 0.08, y), (width * 0.08 + length, y)], fill=(40, 40, 40), width=1)
    else:
        raise ValueError(f"unknown off-target scene {scene!r}")
    return img


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def matching_caption(concept: int, rng: np.random.Generator, *, entity: bool) -> str:
    """An English caption describing `concept`, with or without an ImageNet-21k noun."""
    colour, shape = CONCEPTS[concept]
    templates = ENTITY_TEMPLATES if entity else PLAIN_TEMPLATES
    return templates[rng.integers(len(templates))].format(c=colour, s=shape)


def _caption(kind: str, concept: int, rng: np.random.Generator, mix: CaptionMix
             ) -> tuple[str | None, int | None, str]:
    """(caption, concept the caption describes or None, language) for one row."""
    if kind in ("match_entity", "match_plain"):
        return matching_caption(concept, rng, entity=kind == "match_entity"), concept, "en"
    if kind == "mismatch":
        other = (concept + 1 + int(rng.integers(len(CONCEPTS) - 1))) % len(CONCEPTS)
        return matching_caption(other, rng, entity=bool(rng.integers(2))), other, "en"
    if kind == "non_english":
        langs = list(FOREIGN) + list(FOREIGN_GENERIC)
        lang = langs[rng.integers(len(langs))]
        if lang in FOREIGN:
            template, colours, shapes = FOREIGN[lang]
            colour, shape = CONCEPTS[concept]
            return template.format(c=colours[colour], s=shapes[shape]), concept, lang
        sentences = FOREIGN_GENERIC[lang]
        return sentences[rng.integers(len(sentences))], None, lang
    if kind == "off_target":
        captions = OFF_TARGET_SCENES[_off_target_scene(concept)]
        return captions[rng.integers(len(captions))], None, "en"
    if kind == "junk":
        if rng.random() < mix.null_fraction_of_junk:
            return None, None, "none"
        colour, shape = CONCEPTS[concept]
        template = JUNK_CAPTIONS[rng.integers(len(JUNK_CAPTIONS))]
        text = template.format(n=int(rng.integers(1000, 99999)), m=int(rng.integers(100, 2000)),
                               c=colour, s=shape)
        return text, None, "none"
    raise AssertionError(kind)


def _off_target_scene(concept: int) -> str:
    """An off-target row's scene, from its concept draw (which its image does not show)."""
    return tuple(OFF_TARGET_SCENES)[concept % len(OFF_TARGET_SCENES)]


def _original_sizes(rng: np.random.Generator, n: int, mix: SizeMix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(width, height, size kind) of the images as they were on the web."""
    kinds = rng.choice(4, size=n, p=[1 - mix.small - mix.extreme_aspect - mix.boundary,
                                     mix.small, mix.extreme_aspect, mix.boundary])
    short = rng.integers(200, 1200, size=n)
    aspect = rng.uniform(1.0, 2.2, size=n)
    short = np.where(kinds == 1, rng.integers(24, 200, size=n), short)
    aspect = np.where(kinds == 2, rng.uniform(3.05, 7.0, size=n), aspect)
    boundary_short = kinds == 3
    short = np.where(boundary_short, 200, short)
    aspect = np.where(boundary_short, np.where(rng.random(n) < 0.5, 3.0, 1.5), aspect)
    long = np.round(short * aspect).astype(np.int64)
    landscape = rng.random(n) < 0.6
    width = np.where(landscape, long, short).astype(np.int64)
    height = np.where(landscape, short, long).astype(np.int64)
    names = np.array(["normal", "small", "extreme_aspect", "boundary"])
    return width, height, names[kinds]


def _stored_size(width: int, height: int, image_px: int) -> tuple[int, int]:
    """Size of the stored image: longer side `image_px`, small originals stay small."""
    scale = image_px / max(width, height)
    if min(width, height) < 200:  # a small web image stays low resolution
        scale = min(scale, min(width, height) / 200 * image_px / max(width, height) * 1.5)
    return max(4, round(width * scale)), max(4, round(height * scale))


# --- the pool ---------------------------------------------------------------------------------
@dataclass
class _Rows:
    uid: list[str]
    url: list[str]
    text: list[str | None]
    width: np.ndarray
    height: np.ndarray
    face_bboxes: list[list[list[float]]]
    concept: np.ndarray
    caption_kind: np.ndarray
    caption_concept: list[int | None]
    language: list[str]
    size_kind: np.ndarray
    downloaded: np.ndarray
    duplicate_group: np.ndarray  # planted near-duplicate group of each row (-1: none)
    duplicate_source: np.ndarray  # the first row of the row's group (the row itself when none)
    eval_copy: np.ndarray  # (concept, index within the concept) of the eval image a row copies; -1: none


def _plan_rows(cfg: SynthConfig) -> _Rows:
    """Everything about each row except its image: vectorised draws from one seeded stream."""
    n = cfg.samples
    rng = np.random.default_rng([cfg.seed, 1])
    hexed = rng.bytes(16 * n).hex()
    uid = [hexed[i:i + 32] for i in range(0, 32 * n, 32)]
    kinds = list(cfg.captions.fractions())
    caption_kind = np.array(kinds)[rng.choice(len(kinds), size=n, p=list(cfg.captions.fractions().values()))]
    concept = rng.integers(len(CONCEPTS), size=n)
    width, height, size_kind = _original_sizes(rng, n, cfg.sizes)
    downloaded = rng.random(n) >= cfg.download_failure
    duplicate_group = plant_duplicate_groups(n, cfg.duplicates, cfg.seed)
    sources = group_sources(duplicate_group)
    planted = duplicate_group >= 0
    concept[planted] = concept[sources[planted]]  # a copy shows what its source shows
    eval_copy = plant_eval_copies(cfg, ~planted & downloaded)
    copies = eval_copy[:, 0] >= 0
    concept[copies] = eval_copy[copies, 0]
    has_face = rng.random(n) < 0.05
    boxes = rng.uniform(0, 0.5, size=(n, 2))
    face_bboxes = [[[round(x, 4), round(y, 4), round(x + 0.2, 4), round(y + 0.25, 4)]] if f else []
                   for f, (x, y) in zip(has_face, boxes)]
    text, caption_concept, language = [], [], []
    caption_rng = np.random.default_rng([cfg.seed, 2])
    for kind, c in zip(caption_kind, concept):
        t, cc, lang = _caption(str(kind), int(c), caption_rng, cfg.captions)
        text.append(t)
        caption_concept.append(cc)
        language.append(lang)
    url = [f"{cfg.url_base}/{u}.jpg" for u in uid]
    return _Rows(uid, url, text, width, height, face_bboxes, concept, caption_kind,
                 caption_concept, language, size_kind, downloaded, duplicate_group, sources, eval_copy)


GROUP_SIZES = (2, 3, 4, 5)
DUPLICATE_NOISE = 0.15  # a planted copy's embedding: its source's plus this much of a random unit direction


def plant_duplicate_groups(n: int, fraction: float, seed: int) -> np.ndarray:
    """The planted near-duplicate group (0, 1, ...) of each of `n` rows, -1 for most: groups of
    2-5 rows scattered over the pool (so over its files) until `fraction` of the rows are in one.
    The group's first row is its source; the others are its copies."""
    group = np.full(n, -1, dtype=np.int64)
    if fraction <= 0 or n < 2:
        return group
    rng = np.random.default_rng([seed, 9])
    sizes = []
    while sum(sizes) < min(n, round(fraction * n)):
        sizes.append(int(rng.choice(GROUP_SIZES)))
    if sum(sizes) > n:
        sizes[-1] -= sum(sizes) - n
        if sizes[-1] < 2:
            sizes.pop()
    rows = rng.permutation(n)[:sum(sizes)]
    group[rows] = np.repeat(np.arange(len(sizes)), sizes)
    return group


EVAL_SEED_OFFSET = 1_000_003  # the eval set's seed: the pool's seed plus this


def plant_eval_copies(cfg: SynthConfig, allowed: np.ndarray) -> np.ndarray:
    """(concept, index) of the eval image each row's image copies, (-1, -1) for most: `cfg.eval_copies`
    rows drawn from `allowed` (downloaded rows outside the duplicate groups, so every copy is in
    the shards), each copying a random eval image (several rows may copy the same one)."""
    out = np.full((len(allowed), 2), -1, dtype=np.int64)
    if cfg.eval_copies <= 0:
        return out
    candidates = np.flatnonzero(allowed)
    if cfg.eval_copies > len(candidates):
        raise ValueError(f"eval_copies={cfg.eval_copies} is more than the {len(candidates)} downloaded rows "
                         "outside the duplicate groups")
    rng = np.random.default_rng([cfg.seed, 10])
    rows = np.sort(rng.choice(candidates, cfg.eval_copies, replace=False))
    out[rows, 0] = rng.integers(len(CONCEPTS), size=len(rows))
    out[rows, 1] = rng.integers(cfg.eval_per_class, size=len(rows))
    return out


def eval_image(cfg: SynthConfig, concept: int, index: int) -> Image.Image:
    """The `index`-th eval image of `concept`, drawn as `write_eval_set` draws it."""
    rng = np.random.default_rng([cfg.seed + EVAL_SEED_OFFSET, 5, concept, index])
    return render_concept(concept, rng, width=cfg.image_px, height=cfg.image_px)


def group_sources(group: np.ndarray) -> np.ndarray:
    """Per row, the first row of its planted group (itself when it has none)."""
    source = np.arange(len(group))
    planted = np.flatnonzero(group >= 0)
    if len(planted):
        ids, first = np.unique(group[planted], return_index=True)
        first_row = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
        first_row[ids] = planted[first]
        source[planted] = first_row[group[planted]]
    return source


def _row_image(cfg: SynthConfig, rows: _Rows, i: int) -> bytes:
    if rows.eval_copy[i, 0] >= 0:  # a near-copy of an eval image
        return _near_copy(encode_jpeg(eval_image(cfg, int(rows.eval_copy[i, 0]), int(rows.eval_copy[i, 1]))),
                          np.random.default_rng([cfg.seed, 11, i]))
    source = int(rows.duplicate_source[i])
    if source != i:  # a copy: the source re-encoded, resized or slightly cropped
        return _near_copy(_row_image(cfg, rows, source), np.random.default_rng([cfg.seed, 8, i]))
    rng = np.random.default_rng([cfg.seed, 3, i])
    w, h = _stored_size(int(rows.width[i]), int(rows.height[i]), cfg.image_px)
    if rows.caption_kind[i] == "off_target":
        return encode_jpeg(render_off_target(_off_target_scene(int(rows.concept[i])), rng, width=w, height=h))
    return encode_jpeg(render_concept(int(rows.concept[i]), rng, width=w, height=h))


def _near_copy(jpeg: bytes, rng: np.random.Generator) -> bytes:
    """`jpeg` slightly cropped (up to 6% a side), resized by 80-100% and re-encoded."""
    with Image.open(io.BytesIO(jpeg)) as im:
        img = im.convert("RGB")
    w, h = img.size
    dx, dy = (int(rng.integers(0, max(1, round(0.06 * v)) + 1)) for v in (w, h))
    img = img.crop((dx, dy, w - int(rng.integers(0, dx + 1)), h - int(rng.integers(0, dy + 1))))
    scale = float(rng.uniform(0.8, 1.0))
    img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))))
    return encode_jpeg(img, quality=int(rng.integers(60, 95)))


EMBEDDING_WIDTHS = (("b32", 512), ("l14", 768))  # the archs of the npz, in drawing order


class RandomEmbeddings:
    """Random L2-normalised embeddings whose dot products spread like CLIP scores, file by file.

    Not a model's output: a stand-in for tests and benchmarks that need the columns filled.
    The values are those of one seeded stream drawn for the whole pool at once (per arch:
    image normals (n, dim), noise normals (n, dim), target scores (n, 1)), but only the rows
    asked for are ever held, so memory follows the file size, not the pool size. Normals use a
    variable number of random words, so the start of each draw in the stream is found by one
    pass through it (`_draw_starts`); each draw then gets its own generator that `take` advances.
    """

    def __init__(self, seed: int, n: int, *, chunk_rows: int = 4096, duplicate_group: np.ndarray | None = None,
                 eval_copy: np.ndarray | None = None, eval_per_class: int = 0):
        self.n = n
        self._taken = 0
        self._seed = seed
        self._group = duplicate_group  # rows of a planted group get near-copies of one image embedding
        # rows copying an eval image get near-copies of its embedding (`eval_embeddings`)
        self._eval_copy, self._eval_per_class = eval_copy, eval_per_class
        self._draws = {}
        for name, state in _draw_starts(seed, n, chunk_rows).items():
            gen = np.random.Generator(np.random.PCG64())
            gen.bit_generator.state = state
            self._draws[name] = gen

    def take(self, rows: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The next `rows` rows: ({npz key: float16 (rows, dim)}, {arch: float32 score (rows,)})."""
        if self._taken + rows > self.n:
            raise ValueError(f"asked for rows up to {self._taken + rows} of a pool of {self.n}")
        self._taken += rows
        embeddings, scores = {}, {}
        for arch, dim in EMBEDDING_WIDTHS:
            img = self._draws[f"{arch}_img"].standard_normal((rows, dim)).astype(np.float32)
            img /= np.linalg.norm(img, axis=1, keepdims=True)
            self._plant(img, arch, self._taken - rows)
            noise = self._draws[f"{arch}_noise"].standard_normal((rows, dim)).astype(np.float32)
            noise -= (noise * img).sum(1, keepdims=True) * img
            noise /= np.linalg.norm(noise, axis=1, keepdims=True)
            target = self._draws[f"{arch}_target"].uniform(-0.05, 0.45, size=(rows, 1)).astype(np.float32)
            txt = target * img + np.sqrt(1 - target ** 2) * noise
            img16, txt16 = img.astype(np.float16), txt.astype(np.float16)
            embeddings[f"{arch}_img"], embeddings[f"{arch}_txt"] = img16, txt16
            scores[arch] = (img16.astype(np.float32) * txt16.astype(np.float32)).sum(1)
        return embeddings, scores


    def _plant(self, img: np.ndarray, arch: str, first_row: int) -> None:
        """Rows of a planted group: their group's direction plus `DUPLICATE_NOISE` of their own
        (pairwise cosines about 1 / (1 + 0.15^2) = 0.98), drawn per group and per row so they do
        not depend on how the pool is split into files. Rows copying an eval image: that image's
        embedding (`eval_embeddings`) plus as much noise (cosine about 0.99 to it)."""
        dim, rows = img.shape[1], slice(first_row, first_row + len(img))
        sources: dict[int, np.ndarray] = {}
        if self._group is not None:
            groups = self._group[rows]
            for j in np.flatnonzero(groups >= 0):
                base = np.random.default_rng([self._seed, 5, int(groups[j]), dim]).standard_normal(dim)
                sources[int(j)] = base / np.linalg.norm(base)
        if self._eval_copy is not None and (self._eval_copy[rows, 0] >= 0).any():
            targets = eval_embeddings(self._seed, self._eval_per_class, dim)
            copies = self._eval_copy[rows]
            for j in np.flatnonzero(copies[:, 0] >= 0):
                sources[int(j)] = targets[copies[j, 0] * self._eval_per_class + copies[j, 1]]
        for j, base in sources.items():
            own = np.random.default_rng([self._seed, 6, first_row + j, dim]).standard_normal(dim)
            v = base + DUPLICATE_NOISE * own / np.linalg.norm(own)
            img[j] = v / np.linalg.norm(v)


def eval_embeddings(seed: int, per_class: int, dim: int) -> np.ndarray:
    """With --random-scores, the eval images' embeddings in the pool's random embedding space
    (unit rows, float32; row concept * per_class + index, the eval set's order), written as
    ``eval/<arch>_img.npy``: what the pool's model would give for them, so a contamination
    check (``--eval-sets synth=<pool>/eval/l14_img.npy``) finds the planted copies."""
    emb = np.random.default_rng([seed, 12, dim]).standard_normal((len(CONCEPTS) * per_class, dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)


def _draw_starts(seed: int, n: int, chunk_rows: int) -> dict[str, dict]:
    """The generator state at the start of each draw of the pool-wide stream, in order."""
    rng = np.random.default_rng([seed, 4])
    starts = {}
    for arch, dim in EMBEDDING_WIDTHS:
        for draw in ("img", "noise", "target"):
            starts[f"{arch}_{draw}"] = rng.bit_generator.state
            for lo in range(0, n, chunk_rows):  # skip the draw without holding it
                rows = min(chunk_rows, n - lo)
                if draw == "target":
                    rng.uniform(-0.05, 0.45, size=(rows, 1))
                else:
                    rng.standard_normal((rows, dim))
    return starts


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed, so that a rerun writes byte-identical shards
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shards(cfg: SynthConfig, rows: _Rows, shards_dir: Path) -> tuple[list[int], list[str], list[str]]:
    """img2dataset-style shards. Returns each row's shard id, key and image sha256."""
    n = cfg.samples
    shard_of = [-1] * n
    key_of = [""] * n
    sha_of = [""] * n
    key_digits = len(str(cfg.shard_size - 1))
    num_shards = math.ceil(n / cfg.shard_size)
    shards_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(total=n, desc="rendering shards", unit="img", file=sys.stderr) as bar:
        for shard in range(num_shards):
            lo, hi = shard * cfg.shard_size, min(n, (shard + 1) * cfg.shard_size)
            status_rows = []
            with atomic_path(shards_dir / SHARD_FORMAT.format(shard)) as tmp, \
                    tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for i in range(lo, hi):
                    key = f"{shard:08d}{i - lo:0{key_digits}d}"
                    jpg = _row_image(cfg, rows, i)
                    sha = hashlib.sha256(jpg).hexdigest()
                    shard_of[i], key_of[i], sha_of[i] = shard, key, sha
                    ok = bool(rows.downloaded[i])
                    with Image.open(io.BytesIO(jpg)) as im:
                        w, h = im.size
                    meta = {
                        "url": rows.url[i], "caption": rows.text[i], "key": key,
                        "status": "success" if ok else "failed_to_download",
                        "error_message": None if ok else "HTTP Error 404: Not Found",
                        "width": w if ok else None, "height": h if ok else None,
                        "original_width": int(rows.width[i]) if ok else None,
                        "original_height": int(rows.height[i]) if ok else None,
                        "exif": "{}" if ok else None, "sha256": sha if ok else None,
                        "uid": rows.uid[i],
                    }
                    status_rows.append(meta)
                    if ok:
                        _tar_add(tar, f"{key}.jpg", jpg)
                        _tar_add(tar, f"{key}.txt", (rows.text[i] or "").encode())
                        _tar_add(tar, f"{key}.json", json.dumps(meta).encode())
                    bar.update(1)
            successes = sum(1 for r in status_rows if r["status"] == "success")
            with atomic_path(shards_dir / SHARD_PARQUET_FORMAT.format(shard)) as tmp:
                pq.write_table(pa.Table.from_pylist(status_rows), tmp)
            write_json_atomic(shards_dir / SHARD_STATS_FORMAT.format(shard), {
                "count": hi - lo, "successes": successes, "failed_to_download": hi - lo - successes,
                "failed_to_resize": 0, "duration": 0.0, "start_time": 0.0, "end_time": 0.0,
                "status_dict": {"success": successes,
                                **({"HTTP Error 404: Not Found": hi - lo - successes}
                                   if hi - lo - successes else {})},
            })
    return shard_of, key_of, sha_of


EVAL_TEMPLATES = ("a photo of a {c}.", "a drawing of a {c}.", "a {c} icon.", "a picture of the {c}.",
                  "a {c} on a background.")


EVAL_SHARDS = 4  # DataComp's evaluation reads with 4 loader workers: webdataset needs >= 4 shards


def write_eval_set(out: Path, *, seed: int, per_class: int, image_px: int = 64,
                   shards: int = EVAL_SHARDS) -> int:
    """Held-out eval set in DataComp's webdataset layout; returns the number of images.

    Layout (what DataComp's `download_evalsets.py` writes, so its `evaluate.py` reads it):
    `test/0.tar` .. `test/<shards-1>.tar` (`<key>.jpg` + `<key>.cls`, the images dealt to the
    shards in turn), `test/nshards.txt`, `classnames.txt`, `zeroshot_classification_templates.txt`
    (templates use `{c}` as DataComp's do).
    """
    (out / "test").mkdir(parents=True, exist_ok=True)
    samples = []
    for concept in range(len(CONCEPTS)):
        for j in range(per_class):
            rng = np.random.default_rng([seed, 5, concept, j])
            samples.append((f"{len(samples):06d}", concept,
                            encode_jpeg(render_concept(concept, rng, width=image_px, height=image_px))))
    for shard in range(shards):
        with atomic_path(out / "test" / f"{shard}.tar") as tmp, \
                tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, concept, jpg in samples[shard::shards]:
                _tar_add(tar, f"{key}.jpg", jpg)
                _tar_add(tar, f"{key}.cls", str(concept).encode())
    (out / "test" / "nshards.txt").write_text(f"{shards}\n")
    (out / "classnames.txt").write_text("".join(concept_name(c) + "\n" for c in range(len(CONCEPTS))))
    (out / "zeroshot_classification_templates.txt").write_text("".join(t + "\n" for t in EVAL_TEMPLATES))
    return len(samples)


def _file_stems(cfg: SynthConfig, num_files: int) -> list[str]:
    rng = np.random.default_rng([cfg.seed, 6])
    return sorted(rng.bytes(16).hex() for _ in range(num_files))


def _composition(rows: _Rows) -> dict:
    n = len(rows.uid)

    def fractions(values) -> dict:
        keys, counts = np.unique(np.asarray(values), return_counts=True)
        return {str(k): {"count": int(c), "fraction": round(int(c) / n, 4)} for k, c in zip(keys, counts)}

    return {"caption_kind": fractions(rows.caption_kind), "language": fractions(rows.language),
            "size_kind": fractions(rows.size_kind),
            "downloaded": fractions(np.where(rows.downloaded, "success", "failed_to_download"))}


def generate(out: str | Path, cfg: SynthConfig = SynthConfig(), *, overwrite: bool = False) -> dict:
    """Write the synthetic pool to `out` and return its summary (also saved as pool.json).

    The pool is built in a temporary folder beside `out` and renamed into place, so an
    existing `out` is always complete. If `out` holds a pool made with the same config it is
    kept as it is (the rerun is free); a different config needs `overwrite=True`.
    """
    out = Path(out)
    config = {**asdict(cfg), "generator": "pools.synth", "version": 1}
    if (out / "pool.json").is_file():
        existing = json.loads((out / "pool.json").read_text())
        if existing.get("config") == json.loads(json.dumps(config)):
            return existing
        if not overwrite:
            raise FileExistsError(f"{out} holds a pool made with other settings; pass --overwrite "
                                  "to replace it or choose another --out")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not a synthetic pool; choose another --out")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    if cfg.eval_copies and not (cfg.images or cfg.random_scores):
        raise ValueError("eval copies need images (an eval set) or --random-scores (eval embeddings): "
                         "leave out --metadata-only or add --random-scores")
    rows = _plan_rows(cfg)
    n = cfg.samples
    if cfg.images:
        shard_of, key_of, sha_of = _write_shards(cfg, rows, tmp / "shards")
        eval_count = write_eval_set(tmp / "eval", seed=cfg.seed + EVAL_SEED_OFFSET, per_class=cfg.eval_per_class,
                                    image_px=cfg.image_px)
    else:
        shard_of, key_of = [-1] * n, [""] * n
        sha_of = [hashlib.sha256(bytes.fromhex(u)).hexdigest() for u in rows.uid]  # no image exists
        eval_count = 0
    if cfg.random_scores:
        (tmp / "eval").mkdir(exist_ok=True)
        for arch, dim in EMBEDDING_WIDTHS:
            np.save(tmp / "eval" / f"{arch}_img.npy", eval_embeddings(cfg.seed, cfg.eval_per_class, dim))

    note = ("CLIP score columns hold random placeholder values (--random-scores), not model output"
            if cfg.random_scores else
            "CLIP score columns are empty (null) until `python -m pipeline.score` fills them")
    table = pa.table({
        "uid": pa.array(rows.uid, pa.string()), "url": pa.array(rows.url, pa.string()),
        "text": pa.array(rows.text, pa.string()),
        "original_width": pa.array(rows.width, pa.int64()), "original_height": pa.array(rows.height, pa.int64()),
        # Null until the files are written: with --random-scores each file fills its own.
        "clip_b32_similarity_score": pa.nulls(n, pa.float32()),
        "clip_l14_similarity_score": pa.nulls(n, pa.float32()),
        "face_bboxes": pa.array(rows.face_bboxes, METADATA_SCHEMA.field("face_bboxes").type),
        "sha256": pa.array(sha_of, pa.string()),
    }, schema=METADATA_SCHEMA.with_metadata({"datacomp_synthetic": json.dumps({"seed": cfg.seed, "note": note})}))

    num_files = max(1, math.ceil(n / cfg.rows_per_file))
    stems = _file_stems(cfg, num_files)
    (tmp / "metadata").mkdir()
    file_of = np.empty(n, dtype=object)
    random_embeddings = (RandomEmbeddings(cfg.seed, n, duplicate_group=rows.duplicate_group,
                                          eval_copy=rows.eval_copy, eval_per_class=cfg.eval_per_class)
                         if cfg.random_scores else None)
    for f, stem in enumerate(stems):
        lo, hi = f * cfg.rows_per_file, min(n, (f + 1) * cfg.rows_per_file)
        part = table.slice(lo, hi - lo)
        if random_embeddings is not None:
            embeddings, scores = random_embeddings.take(hi - lo)
            for arch, column in SCORE_COLUMNS.items():
                part = part.set_column(part.schema.get_field_index(column), part.schema.field(column),
                                       pa.array(scores[arch], pa.float32()))
            np.savez_compressed(tmp / "metadata" / f"{stem}.npz", **{k: embeddings[k] for k in NPZ_KEYS})
        pq.write_table(part, tmp / "metadata" / f"{stem}.parquet")
        file_of[lo:hi] = stem

    # What the image shows: a planted copy shows its source's image, an eval copy its eval image.
    off_target = (rows.caption_kind[rows.duplicate_source] == "off_target") & (rows.eval_copy[:, 0] < 0)
    shown = np.where(off_target, NO_CONCEPT, rows.concept)
    truth = pa.table({
        "uid": rows.uid, "metadata_file": file_of.tolist(),
        "caption_kind": rows.caption_kind.tolist(), "concept": shown.astype(np.int64),
        "concept_name": [concept_name(int(c)) for c in shown],
        "caption_concept": pa.array(rows.caption_concept, pa.int64()), "language": rows.language,
        "size_kind": rows.size_kind.tolist(), "downloaded": rows.downloaded,
        "shard": pa.array(shard_of, pa.int64()), "key": key_of,
        # planted near-duplicates (--duplicates): the group (-1: none) and its first row's uid
        "duplicate_group": pa.array(rows.duplicate_group, pa.int64()),
        "duplicate_of": [rows.uid[s] if g >= 0 else None for g, s in zip(rows.duplicate_group, rows.duplicate_source)],
        # planted near-copies of eval images (--eval-copies): the eval image's concept and index (-1: none)
        "eval_copy_concept": pa.array(rows.eval_copy[:, 0], pa.int64()),
        "eval_copy_index": pa.array(rows.eval_copy[:, 1], pa.int64()),
    })
    pq.write_table(truth, tmp / "ground_truth.parquet")

    summary = {
        "config": json.loads(json.dumps(config)), "rows": n, "metadata_files": num_files,
        "shards": math.ceil(n / cfg.shard_size) if cfg.images else 0,
        "shard_samples": int(rows.downloaded.sum()) if cfg.images else 0,
        "eval_images": eval_count, "eval_classes": len(CONCEPTS) if cfg.images else 0,
        "composition": _composition(rows), "scores": note,
        "duplicate_groups": {"groups": int(rows.duplicate_group.max() + 1), "rows": int((rows.duplicate_group >= 0).sum())},
        "eval_copies": int((rows.eval_copy[:, 0] >= 0).sum()),
        "eval_embeddings": [f"eval/{arch}_img.npy" for arch, _ in EMBEDDING_WIDTHS] if cfg.random_scores else [],
    }
    write_json_atomic(tmp / "pool.json", summary)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return summary


def describe(out: Path, summary: dict) -> str:
    """Human-readable summary of a generated pool."""
    lines = [f"synthetic pool at {out}",
             f"  {summary['rows']} rows in {summary['metadata_files']} metadata file(s): {out / 'metadata'}"]
    if summary["shards"]:
        lines.append(f"  {summary['shard_samples']} images in {summary['shards']} webdataset shard(s): "
                     f"{out / 'shards'} (the other rows 'failed to download')")
        lines.append(f"  eval set: {summary['eval_images']} images of {summary['eval_classes']} classes: "
                     f"{out / 'eval'}")
    lines.append(f"  {summary['scores']}")
    if summary.get("eval_embeddings"):
        lines.append(f"  eval images' embeddings in the same random space: "
                     f"{', '.join(str(out / p) for p in summary['eval_embeddings'])}")
    lines.append("  caption kinds:")
    for kind, v in summary["composition"]["caption_kind"].items():
        lines.append(f"    {kind:<13} {v['count']:>8}  {v['fraction']:.1%}")
    lines.append("  image sizes:")
    for kind, v in summary["composition"]["size_kind"].items():
        lines.append(f"    {kind:<15} {v['count']:>8}  {v['fraction']:.1%}")
    lines.append(f"  ground truth (not part of the pool): {out / 'ground_truth.parquet'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="python -m pools.synth", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m pools.synth --out data/synthetic --samples 10000 --seed 0")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the pool to")
    parser.add_argument("--samples", type=int, default=SynthConfig.samples, help="rows in the pool (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--rows-per-file", type=int, default=SynthConfig.rows_per_file,
                        help="rows per metadata parquet (default %(default)s)")
    parser.add_argument("--shard-size", type=int, default=SynthConfig.shard_size,
                        help="input rows per webdataset shard (default %(default)s)")
    parser.add_argument("--image-px", type=int, default=SynthConfig.image_px,
                        help="longer side of stored images in pixels (default %(default)s)")
    parser.add_argument("--eval-per-class", type=int, default=SynthConfig.eval_per_class,
                        help="eval images per class (default %(default)s)")
    parser.add_argument("--metadata-only", action="store_true",
                        help="write metadata only: no image shards, no eval set (fast, for big pools)")
    parser.add_argument("--random-scores", action="store_true",
                        help="fill CLIP scores and npz embeddings with random, self-consistent "
                             "placeholder values (for tests and benchmarks; not model output)")
    parser.add_argument("--duplicates", type=float, default=0.0,
                        help="fraction of rows in planted near-duplicate groups of 2-5 (copies of one image: "
                             "re-encoded, resized, cropped; with --random-scores near-copies of one embedding), "
                             "recorded in ground_truth.parquet (default 0; the demo uses 0.15)")
    parser.add_argument("--eval-copies", type=int, default=0,
                        help="rows whose image is a near-copy (re-encoded, resized, cropped) of an eval-set "
                             "image, recorded in ground_truth.parquet (eval_copy_concept, eval_copy_index); "
                             "with --random-scores also a near-copy of that image's embedding in "
                             "eval/{b32,l14}_img.npy; default 0, the demo uses 200")
    parser.add_argument("--overwrite", action="store_true", help="replace a pool made with other settings")
    args = parser.parse_args(argv)
    if args.samples <= 0:
        parser.error("--samples must be positive")
    if not 0.0 <= args.duplicates <= 1.0:
        parser.error("--duplicates must be a fraction in [0, 1]")
    if args.eval_copies < 0 or (args.eval_copies and args.metadata_only and not args.random_scores):
        parser.error("--eval-copies must be a count >= 0, and needs images (no --metadata-only) or "
                     "--random-scores (eval embeddings)")
    cfg = SynthConfig(samples=args.samples, seed=args.seed, rows_per_file=args.rows_per_file,
                      shard_size=args.shard_size, image_px=args.image_px,
                      eval_per_class=args.eval_per_class, images=not args.metadata_only,
                      random_scores=args.random_scores, duplicates=args.duplicates, eval_copies=args.eval_copies)
    summary = generate(args.out, cfg, overwrite=args.overwrite)
    print(describe(args.out, summary))
    return summary


if __name__ == "__main__":
    main()
