#!/usr/bin/env python3
"""Writes the demo fine-tuning data: ADGEN-style attribute -> ad-copy pairs, invented here.

`qlora train` with no arguments fine-tunes the small demo model on these files, so each example
is short (SmolLM2's tokenizer spends ~2.3 tokens per Chinese character): 2-3 attributes in, one
or two sentences of 12-25 characters out, under 128 tokens in all with the chat template
(tests/tests/demo_data.rs checks that with the real tokenizer).

The copy is composed from per-attribute phrase templates, each with a few variants picked at
random, so the mapping is learnable (every attribute value shows up in the copy, in a fixed order
of clauses) but not a lookup (the wording varies, and some phrases depend on the value, e.g. the
feel of a material). Dev attribute combinations never occur in train, and every attribute value
used in dev is seen in train.

Standard library only; deterministic (fixed seed). Usage, from the repository root:
    python3 scripts/make_demo_data.py [--out data/demo]
"""

import argparse
import json
import random
from pathlib import Path

SEED = 20240601
TRAIN_SIZE = 300
DEV_SIZE = 40
MIN_CHARS, MAX_CHARS = 12, 25

# Garment types: the noun, and how the copy talks about wearing it.
TYPES = {
    "上衣": "上身",
    "衬衫": "上身",
    "T恤": "上身",
    "卫衣": "上身",
    "毛衣": "上身",
    "外套": "上身",
    "连衣裙": "穿上",
    "半身裙": "穿上",
    "裤": "穿上",
    "牛仔裤": "穿上",
}

# Value -> a word that goes with it, so some phrases depend on the value, not only on the key.
FITS = {"宽松": "不挑人", "修身": "显身材", "直筒": "利落", "收腰": "显高", "落肩": "随性"}
MATERIALS = {"纯棉": "透气", "雪纺": "飘逸", "针织": "柔软", "真丝": "顺滑", "羊毛": "保暖", "亚麻": "清爽"}
COLORS = ["白色", "黑色", "红色", "蓝色", "粉色", "灰色", "绿色", "米色"]
STYLES = {"简约": "大方", "休闲": "自在", "复古": "有韵味", "甜美": "减龄", "通勤": "干练", "街头": "有个性", "文艺": "清新"}
PATTERNS = ["条纹", "格子", "碎花", "印花", "刺绣", "波点", "字母"]

# The keys after 类型, in the order they are written in `content` (as ADGEN writes a fixed order).
OPTIONAL_KEYS = ["版型", "材质", "颜色", "风格", "图案"]
# At most this many of them per example: SmolLM2 spends ~2.3 tokens per Chinese character and
# its chat template ~30 tokens, so a third would push examples past 128 tokens.
MAX_OPTIONAL = 2
VALUES = {
    "类型": list(TYPES),
    "版型": list(FITS),
    "材质": list(MATERIALS),
    "颜色": COLORS,
    "风格": list(STYLES),
    "图案": PATTERNS,
}

# Clause templates per key; `{v}` is the value, `{w}` the value's word (see the tables above).
CLAUSES = {
    "版型": ["{v}版型{w}", "{v}剪裁很{w}"],
    "材质": ["{v}面料{w}", "{v}材质很{w}"],
    "颜色": ["{v}耐看", "{v}显气质", "一抹{v}很亮眼"],
    "风格": ["{v}风格{w}", "{v}又{w}"],
    "图案": ["{v}图案吸睛", "点缀{v}元素"],
}
OPENINGS = ["这款{t}", "推荐这款{t}"]
# Closings pad short copy; `{u}` is how the type is worn (上身 / 穿上).
CLOSINGS = ["{u}很出彩。", "日常好搭。", "{u}就有型。"]


def wearable(garment, key, value):
    """Rules out the pairs no shop would write: a dropped shoulder needs shoulders, and jeans
    are denim by definition."""
    if value == "落肩":
        return TYPES[garment] == "上身"
    return not (garment == "牛仔裤" and key == "材质")


def attribute_sets(rng):
    """Yields random attribute sets: 类型, then 1 to `MAX_OPTIONAL` other keys in `OPTIONAL_KEYS`
    order."""
    while True:
        garment = rng.choice(VALUES["类型"])
        keys = rng.sample(OPTIONAL_KEYS, rng.randint(1, MAX_OPTIONAL))
        pairs = [(k, rng.choice(VALUES[k])) for k in OPTIONAL_KEYS if k in keys]
        if all(wearable(garment, k, v) for k, v in pairs):
            yield (("类型", garment),) + tuple(pairs)


def content(attributes):
    return "*".join(f"{k}#{v}" for k, v in attributes)


def word_of(key, value):
    return {"版型": FITS, "材质": MATERIALS, "风格": STYLES}.get(key, {}).get(value, "")


def summary(attributes, rng):
    """The ad copy: one sentence, an opening naming the type and a clause per other attribute,
    then, for half the examples (and always where the copy is under `MIN_CHARS`), a closing if it
    fits in `MAX_CHARS`."""
    garment = attributes[0][1]
    clauses = [
        rng.choice(CLAUSES[k]).format(v=v, w=word_of(k, v)) for k, v in attributes[1:]
    ]
    text = "，".join([rng.choice(OPENINGS).format(t=garment)] + clauses) + "。"
    if len(text) < MIN_CHARS or rng.random() < 0.5:
        closing = rng.choice(CLOSINGS).format(u=TYPES[garment])
        if len(text) + len(closing) <= MAX_CHARS:
            text += closing
    return text


def build(seed):
    rng = random.Random(seed)
    combos = []
    seen = set()
    for attributes in attribute_sets(rng):
        if attributes not in seen:
            seen.add(attributes)
            combos.append(attributes)
        if len(combos) == TRAIN_SIZE + DEV_SIZE:
            break
    dev_combos, train_combos = combos[:DEV_SIZE], combos[DEV_SIZE:]
    train = [{"content": content(a), "summary": summary(a, rng)} for a in train_combos]
    dev = [{"content": content(a), "summary": summary(a, rng)} for a in dev_combos]
    check(train, dev)
    return train, dev


def check(train, dev):
    """Fails loudly if the data breaks the promises made in the module docstring (explicit
    raises rather than `assert`, which `python3 -O` would skip)."""
    train_contents = {row["content"] for row in train}
    if train_contents & {row["content"] for row in dev}:
        raise ValueError("a dev combination is in train")
    train_values = {pair for row in train for pair in row["content"].split("*")}
    for row in dev:
        unseen = [p for p in row["content"].split("*") if p not in train_values]
        if unseen:
            raise ValueError(f"dev attributes never seen in train: {unseen}")
    for row in train + dev:
        n = len(row["summary"])
        if not MIN_CHARS <= n <= MAX_CHARS:
            raise ValueError(f"{n} characters, not {MIN_CHARS}-{MAX_CHARS}: {row['summary']}")


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"))
    args = parser.parse_args()
    train, dev = build(SEED)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "train.jsonl", train)
    write_jsonl(args.out / "dev.jsonl", dev)
    print(f"wrote {len(train)} train and {len(dev)} dev pairs to {args.out}")


if __name__ == "__main__":
    main()
