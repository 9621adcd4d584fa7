"""Write the built-in sample corpus shipped in minillm/assets/sample/ (all text composed here, no third-party text).

    python scripts/make_sample_data.py            # rewrites minillm/assets/sample/{pretrain,sft}.jsonl

The text is generated from small templates with a fixed seed, in English and Chinese: short stories about made-up
people, arithmetic, calendar and color facts, simple descriptions of everyday things, and what minillm is. The SFT
set adds identity conversations ("who are you" in both languages: the assistant is minillm, a small model trained
with minillm), greetings, arithmetic and word-translation questions, so a tiny model trained on it for a few minutes
shows falling loss and learns to say who it is. Deterministic: running it twice gives the same files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# Only the command-line helpers are needed: skip registering the models with transformers on `import minillm`
# (seconds of start-up, see minillm/__init__.py).
os.environ.setdefault("MINILLM_DEFER_MODELS", "1")

from minillm.errors import UserError  # noqa: E402
from minillm.training import perf  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent.parent / "minillm" / "assets" / "sample"

NAMES_EN = [
    "Ada",
    "Ben",
    "Chloe",
    "Dan",
    "Eva",
    "Finn",
    "Grace",
    "Hugo",
    "Iris",
    "Jack",
    "Lena",
    "Max",
    "Nora",
    "Owen",
]
NAMES_ZH = ["小明", "小红", "小华", "阿强", "小丽", "老王", "小李", "阿梅", "小张", "小雨", "大卫", "小林"]
PLACES_EN = [
    "the park",
    "the library",
    "the market",
    "the river",
    "the school",
    "the garden",
    "the station",
    "the hill",
]
PLACES_ZH = ["公园", "图书馆", "市场", "河边", "学校", "花园", "车站", "山上"]
THINGS = [  # (english, chinese, english plural)
    ("apple", "苹果", "apples"),
    ("book", "书", "books"),
    ("cup", "杯子", "cups"),
    ("pencil", "铅笔", "pencils"),
    ("flower", "花", "flowers"),
    ("ball", "球", "balls"),
    ("kite", "风筝", "kites"),
    ("letter", "信", "letters"),
    ("orange", "橘子", "oranges"),
    ("stone", "石头", "stones"),
]
COLORS = [
    ("red", "红色"),
    ("blue", "蓝色"),
    ("green", "绿色"),
    ("yellow", "黄色"),
    ("white", "白色"),
    ("black", "黑色"),
    ("purple", "紫色"),
    ("orange", "橙色"),
]
ANIMALS = [
    ("cat", "猫"),
    ("dog", "狗"),
    ("bird", "鸟"),
    ("fish", "鱼"),
    ("horse", "马"),
    ("rabbit", "兔子"),
    ("duck", "鸭子"),
    ("cow", "牛"),
]
DAYS_EN = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
DAYS_ZH = ["星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"]
WEATHER_EN = ["sunny", "rainy", "windy", "cloudy", "snowy", "warm", "cold"]
WEATHER_ZH = ["晴朗", "下雨", "刮风", "多云", "下雪", "温暖", "寒冷"]
NUM_ZH = ["零", "一", "两", "三", "四", "五", "六", "七", "八", "九", "十"]

IDENTITY_EN = [
    "I am minillm, a small language model trained with the minillm project. I can chat in English and Chinese, "
    "but I am small, so I make mistakes.",
    "I'm minillm: a small language model trained from scratch with minillm, an open-source project for learning "
    "how large language models are built.",
    "My name is minillm. I am a small model trained with the minillm toolkit, from the tokenizer to pretraining "
    "and chat fine-tuning.",
]
IDENTITY_ZH = [
    "我是 minillm，一个用 minillm 项目训练的小型语言模型。我可以用中文和英文聊天，不过我的规模很小，回答可能会出错。",
    "你好！我是 minillm，是用开源项目 minillm 从零开始训练出来的小模型，用来学习大语言模型是怎样一步步做出来的。",
    "我叫 minillm，是一个小型语言模型，由 minillm 工具从分词器、预训练到对话微调完整训练而成。",
]
WHO_EN = [
    "Who are you?",
    "who are you",
    "What is your name?",
    "What are you?",
    "Introduce yourself.",
    "Tell me about yourself.",
    "What's your name?",
    "Are you a human?",
    "Who made you?",
    "Which model are you?",
]
WHO_ZH = [
    "你是谁？",
    "你是谁",
    "你叫什么名字？",
    "介绍一下你自己。",
    "请做个自我介绍。",
    "你是什么模型？",
    "你是人吗？",
    "谁训练了你？",
    "你的名字是什么？",
    "你好，你是谁呀？",
]
GREET = [
    ("Hello!", "Hello! I'm minillm. How can I help you today?"),
    ("Hi", "Hi! What would you like to talk about?"),
    ("Good morning!", "Good morning! I hope you have a nice day."),
    ("Thank you!", "You're welcome! I'm glad I could help."),
    ("Bye!", "Goodbye! Talk to you soon."),
]
GREET_ZH = [
    ("你好！", "你好！我是 minillm，有什么可以帮你的吗？"),
    ("早上好", "早上好！祝你今天过得愉快。"),
    ("谢谢你！", "不客气，很高兴能帮到你。"),
    ("再见", "再见！期待下次聊天。"),
    ("在吗？", "在的，请问有什么问题？"),
]


def story_en(r: random.Random) -> str:
    a, b = r.sample(NAMES_EN, 2)
    place = r.choice(PLACES_EN)
    thing, _, things = r.choice(THINGS)
    n, m = r.randint(2, 9), r.randint(1, 5)
    color, _ = r.choice(COLORS)
    animal, _ = r.choice(ANIMALS)
    day = r.choice(DAYS_EN)
    weather = r.choice(WEATHER_EN)
    parts = [
        f"On {day} the weather was {weather}, so {a} went to {place}.",
        f"{a} carried {n} {color} {things if n > 1 else thing} in a small bag.",
        f"At {place}, {a} met {b}, who was walking a {animal}.",
        f"{b} asked for some of the {things}, and {a} gave {m} of them away."
        if m > 1
        else f"{b} asked for one of the {things}, and {a} gave it away.",
        f"Now {a} had {n - m} {things if n - m > 1 else thing} left."
        if n > m
        else f"{a} gave away every one of them.",
        r.choice(
            [
                f"The {animal} looked happy and sat in the sun.",
                f"They talked about {day} plans until evening.",
                f"Later they walked home together and laughed about the {animal}.",
            ]
        ),
    ]
    return " ".join(parts)


def story_zh(r: random.Random) -> str:
    a, b = r.sample(NAMES_ZH, 2)
    place = r.choice(PLACES_ZH)
    _, thing, _ = r.choice(THINGS)
    n, m = r.randint(2, 9), r.randint(1, 5)
    _, color = r.choice(COLORS)
    _, animal = r.choice(ANIMALS)
    i = r.randrange(7)
    parts = [
        f"{DAYS_ZH[i]}天气{WEATHER_ZH[r.randrange(len(WEATHER_ZH))]}，{a}去了{place}。",
        f"{a}的包里有{NUM_ZH[n]}个{color}的{thing}。",
        f"在{place}，{a}遇到了正在遛{animal}的{b}。",
        f"{b}想要一些{thing}，{a}就送给他{NUM_ZH[m]}个。",
        f"现在{a}还剩{NUM_ZH[n - m]}个{thing}。" if n > m else f"{a}把{thing}全部送了出去。",
        r.choice(
            [
                f"那只{animal}很开心，在阳光下躺了很久。",
                "他们一直聊到傍晚才回家。",
                f"回家的路上，他们还在说那只{animal}。",
            ]
        ),
    ]
    return "".join(parts)


def facts_en(r: random.Random) -> str:
    a, b = r.randint(1, 50), r.randint(1, 50)
    i = r.randrange(7)
    color, _ = r.choice(COLORS)
    animal, _ = r.choice(ANIMALS)
    lines = [
        f"{a} plus {b} equals {a + b}. {max(a, b)} minus {min(a, b)} equals {max(a, b) - min(a, b)}.",
        f"The day after {DAYS_EN[i]} is {DAYS_EN[(i + 1) % 7]}, and the day before it is {DAYS_EN[i - 1]}.",
        f"A week has seven days. {DAYS_EN[5]} and {DAYS_EN[6]} are the weekend.",
        f"A {animal} can be {color}, but the word '{animal}' is the same whatever its color.",
        f"{a} times 2 is {a * 2}, and half of {a * 2} is {a}.",
    ]
    r.shuffle(lines)
    return " ".join(lines[:3])


def facts_zh(r: random.Random) -> str:
    a, b = r.randint(1, 50), r.randint(1, 50)
    i = r.randrange(7)
    _, color = r.choice(COLORS)
    _, animal = r.choice(ANIMALS)
    lines = [
        f"{a}加{b}等于{a + b}。{max(a, b)}减{min(a, b)}等于{max(a, b) - min(a, b)}。",
        f"{DAYS_ZH[i]}的后一天是{DAYS_ZH[(i + 1) % 7]}，前一天是{DAYS_ZH[i - 1]}。",
        "一个星期有七天，星期六和星期日是周末。",
        f"{animal}可以是{color}的，但无论什么颜色，它仍然叫{animal}。",
        f"{a}乘以2等于{a * 2}，{a * 2}的一半是{a}。",
    ]
    r.shuffle(lines)
    return "".join(lines[:3])


ABOUT_EN = [
    "minillm is an open-source project for training small language models end to end: it trains a tokenizer, "
    "pretrains a model on raw text, fine-tunes it on conversations and serves it through a chat interface.",
    "A language model predicts the next token from the tokens before it. Training makes those predictions better "
    "by lowering the loss, the average surprise of the model at each real next token.",
    "A tokenizer splits text into tokens. Byte-level BPE starts from single bytes and repeatedly merges the most "
    "frequent pair, so common words become single tokens and any text can still be encoded.",
    "During pretraining the model reads plain text. During supervised fine-tuning it reads conversations and learns "
    "to answer as an assistant. The assistant in these conversations is called minillm.",
]
ABOUT_ZH = [
    "minillm 是一个开源项目，用来完整地训练小型语言模型：先训练分词器，再用原始文本预训练模型，然后用对话数据微调，最后通过聊天界面提供服务。",
    "语言模型根据前面的词元预测下一个词元。训练的目标是让损失不断下降，也就是让模型对真实的下一个词元越来越不意外。",
    "分词器把文本切分成词元。字节级 BPE 从单个字节开始，不断合并出现最多的相邻组合，所以常见的词会变成一个词元。",
    "预训练阶段，模型阅读普通文本；监督微调阶段，模型阅读对话，学习像助手一样回答问题。对话中的助手名叫 minillm。",
]


def pretrain_docs(r: random.Random, n: int) -> list[str]:
    docs = []
    for k in range(n):
        kind = k % 6
        if kind == 0:
            docs.append(" ".join(story_en(r) for _ in range(r.randint(1, 3))))
        elif kind == 1:
            docs.append("".join(story_zh(r) for _ in range(r.randint(1, 3))))
        elif kind == 2:
            docs.append(facts_en(r))
        elif kind == 3:
            docs.append(facts_zh(r))
        elif kind == 4:
            docs.append(r.choice(ABOUT_EN) + " " + r.choice(IDENTITY_EN))
        else:
            docs.append(r.choice(ABOUT_ZH) + r.choice(IDENTITY_ZH))
    return docs


def sft_rows(r: random.Random, n: int) -> list[dict]:
    rows = []
    for k in range(n):
        kind = k % 8
        if kind in (0, 1):  # identity, the point of the sample set
            zh = kind == 1
            q = r.choice(WHO_ZH if zh else WHO_EN)
            msgs = [
                {"role": "user", "content": q},
                {"role": "assistant", "content": r.choice(IDENTITY_ZH if zh else IDENTITY_EN)},
            ]
            if r.random() < 0.2:
                system = "你是一个乐于助人的助手。" if zh else "You are a helpful assistant."
                msgs.insert(0, {"role": "system", "content": system})
        elif kind == 2:
            q, a = r.choice(GREET + GREET_ZH)
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        elif kind == 3:
            a, b = r.randint(1, 99), r.randint(1, 99)
            if r.random() < 0.5:
                msgs = [
                    {"role": "user", "content": f"What is {a} plus {b}?"},
                    {"role": "assistant", "content": f"{a} plus {b} equals {a + b}."},
                ]
            else:
                msgs = [
                    {"role": "user", "content": f"{a}加{b}等于多少？"},
                    {"role": "assistant", "content": f"{a}加{b}等于{a + b}。"},
                ]
        elif kind == 4:
            en, zh = r.choice(COLORS + ANIMALS + [(t[0], t[1]) for t in THINGS])
            if r.random() < 0.5:
                msgs = [
                    {"role": "user", "content": f'How do you say "{en}" in Chinese?'},
                    {"role": "assistant", "content": f'"{en}" in Chinese is "{zh}".'},
                ]
            else:
                msgs = [
                    {"role": "user", "content": f"“{zh}”用英文怎么说？"},
                    {"role": "assistant", "content": f"“{zh}”的英文是 “{en}”。"},
                ]
        elif kind == 5:
            i = r.randrange(7)
            if r.random() < 0.5:
                msgs = [
                    {"role": "user", "content": f"What day comes after {DAYS_EN[i]}?"},
                    {"role": "assistant", "content": f"{DAYS_EN[(i + 1) % 7]} comes after {DAYS_EN[i]}."},
                ]
            else:
                msgs = [
                    {"role": "user", "content": f"{DAYS_ZH[i]}的后一天是星期几？"},
                    {"role": "assistant", "content": f"{DAYS_ZH[i]}的后一天是{DAYS_ZH[(i + 1) % 7]}。"},
                ]
        elif kind == 6:
            zh = r.random() < 0.5
            story = story_zh(r) if zh else story_en(r)
            q = (
                "请用一句话概括下面的故事：\n" + story
                if zh
                else "Summarize this story in one sentence:\n" + story
            )
            first = story.split("。")[0] + "。" if zh else story.split(". ")[0] + "."
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": first}]
        else:  # multi-turn: greeting, then identity
            zh = r.random() < 0.5
            g = r.choice(GREET_ZH if zh else GREET)
            msgs = [
                {"role": "user", "content": g[0]},
                {"role": "assistant", "content": g[1]},
                {"role": "user", "content": r.choice(WHO_ZH if zh else WHO_EN)},
                {"role": "assistant", "content": r.choice(IDENTITY_ZH if zh else IDENTITY_EN)},
            ]
        rows.append({"messages": msgs})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--pretrain-docs", type=perf.positive_int, default=800)
    parser.add_argument("--sft-rows", type=perf.positive_int, default=1200)
    args = parser.parse_args(argv)
    r = random.Random(1234)
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {args.out}: cannot create the directory ({err.strerror or err})") from None
    with open(args.out / "pretrain.jsonl", "w", encoding="utf-8") as f:
        for doc in pretrain_docs(r, args.pretrain_docs):
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    with open(args.out / "sft.jsonl", "w", encoding="utf-8") as f:
        for row in sft_rows(r, args.sft_rows):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for name in ("pretrain.jsonl", "sft.jsonl"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1024:.0f} KB)")


if __name__ == "__main__":
    perf.run_main(main)
