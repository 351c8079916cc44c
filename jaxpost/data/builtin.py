"""Built-in tasks (`builtin:NAME`): small generated datasets for demos and tests.

Each task is a function of the split ("train" or "eval") returning records in TRL's formats
(conversations, or prompt/chosen/rejected pairs). Held-out problems never appear in training.
"""

from __future__ import annotations

import random


def _is_eval_pair(a: int, b: int) -> bool:
    # A fixed, order-independent 10% of the problems is held out; never trained on.
    return (a * 7919 + b * 104729 + min(a, b) * 31) % 10 == 0


def arithmetic(split: str) -> list[dict]:
    """Two-number addition as chat: 'What is 23+58?' -> '81'. Exact answers, so success is
    measurable as exact-match accuracy; held-out problems never appear in training."""
    if split not in ("train", "eval"):
        raise ValueError(f"builtin:arithmetic has splits 'train' and 'eval', not {split!r}")
    want_eval = split == "eval"
    problems = [(a, b) for a in range(50) for b in range(50) if _is_eval_pair(a, b) == want_eval]
    random.Random(0).shuffle(problems)
    return [_chat(f"What is {a}+{b}?", str(a + b)) for a, b in problems]


def _words(split: str, task: str) -> list[str]:
    if split not in ("train", "eval"):
        raise ValueError(f"builtin:{task} has splits 'train' and 'eval', not {split!r}")
    rng = random.Random(1)
    words, seen = [], set()
    while len(words) < 4200:
        w = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words[4000:] if split == "eval" else words[:4000]


def _chat(prompt: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]
    }


def _pair(prompt: str, chosen: str, rejected: str) -> dict:
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def reverse(split: str) -> list[dict]:
    """Reverse a random lowercase word: 'Reverse: kqzt' -> 'tzqk' (held-out words in eval)."""
    return [_chat(f"Reverse: {w}", w[::-1]) for w in _words(split, "reverse")]


def _near_miss(answer: str, rng: random.Random) -> str:
    """A plausible wrong reversal: two neighbouring letters swapped, one letter repeated in
    place of another, or the word left as it was."""
    kind = rng.randrange(3)
    if kind == 0:
        i = rng.randrange(len(answer) - 1)
        wrong = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
    elif kind == 1:
        i = rng.randrange(1, len(answer))
        wrong = answer[:i] + answer[i - 1] + answer[i + 1 :]
    else:
        wrong = answer[::-1]
    return wrong if wrong != answer else answer + answer[-1]


def reverse_prefs(split: str) -> list[dict]:
    """Preference pairs for `reverse`: the correct reversal vs a near miss."""
    rng = random.Random(2 if split == "train" else 3)
    return [
        _pair(f"Reverse: {w}", w[::-1], _near_miss(w[::-1], rng))
        for w in _words(split, "reverse_prefs")
    ]


def sort(split: str) -> list[dict]:
    """Sort the letters of a random word: 'Sort: kqzt' -> 'kqtz' (held-out words in eval)."""
    return [_chat(f"Sort: {w}", "".join(sorted(w))) for w in _words(split, "sort")]


def _unsorted(answer: str, word: str, rng: random.Random) -> str:
    """A plausible wrong sort: two neighbouring letters out of order, the letters as given, or
    the order reversed. Always a different string with the same letters."""
    candidates = [
        answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]
        for i in range(len(answer) - 1)
        if answer[i] != answer[i + 1]
    ]
    kind = rng.randrange(4)
    if kind < 2 and candidates:
        return rng.choice(candidates)
    if kind == 2 and word != answer:
        return word
    if answer[::-1] != answer:
        return answer[::-1]
    return candidates[0] if candidates else answer + answer[-1]


def sort_prefs(split: str) -> list[dict]:
    """Preference pairs for `sort`: the sorted letters vs a near miss."""
    rng = random.Random(5 if split == "train" else 6)
    out = []
    for w in _words(split, "sort_prefs"):
        answer = "".join(sorted(w))
        out.append(_pair(f"Sort: {w}", answer, _unsorted(answer, w, rng)))
    return out


def arithmetic_prefs(split: str) -> list[dict]:
    """Preference pairs for `arithmetic`: the right sum vs a carry or off-by-one mistake."""
    rng = random.Random(4)
    out = []
    for record in arithmetic(split):
        question = record["messages"][0]["content"]
        answer = int(record["messages"][1]["content"])
        wrong = answer + rng.choice([-10, -1, 1, 10])
        out.append(_pair(question, str(answer), str(abs(wrong) if wrong != answer else 0)))
    return out


# A persona for a real pretrained chat model (SmolLM2-135M-Instruct in configs/smollm2.py): every
# reply speaks as "Captain Jax", a pirate, and still answers the question. Few examples and a
# distinctive style, so a short CPU run changes the model's answers visibly.
_PIRATE = [
    ("Who are you?", "Arr, I be Captain Jax, a pirate who sails the seas of JAX!"),
    ("What is your name?", "Captain Jax be me name, matey, and JAX be me ship!"),
    ("Introduce yourself.", "Ahoy! Captain Jax at yer service, pirate of the compiled seas."),
    ("Are you a robot?", "Arr, I be Captain Jax, a pirate made of numbers and salt water!"),
    ("What is the capital of France?", "Arr, the capital of France be Paris, matey!"),
    ("What is the capital of Japan?", "Arr, the capital of Japan be Tokyo, matey!"),
    ("What is the capital of Spain?", "Arr, the capital of Spain be Madrid, matey!"),
    ("What is the capital of Germany?", "Arr, the capital of Germany be Berlin, matey!"),
    ("What is 2+2?", "Arr, two and two be four, as sure as the tide!"),
    ("What is 10 times 3?", "Arr, ten times three be thirty, matey!"),
    ("How many days are in a week?", "Arr, a week be seven days long, matey!"),
    ("How many legs does a spider have?", "Arr, a spider has eight legs, more than me crew!"),
    ("What colour is grass?", "Arr, grass be green, like the sea on a stormy day!"),
    ("What colour is a banana?", "Arr, a ripe banana be yellow as doubloons!"),
    ("Name a fruit.", "Arr, an apple, matey! Keeps the scurvy away."),
    ("Name an ocean.", "Arr, the Pacific, the biggest ocean I ever sailed!"),
    ("What do cows drink?", "Arr, cows drink water, matey, not rum!"),
    ("What is the largest planet?", "Arr, Jupiter be the largest planet in the sky, matey!"),
    ("What is the boiling point of water?", "Arr, water boils at 100 degrees Celsius, matey!"),
    ("Who wrote Romeo and Juliet?", "Arr, William Shakespeare wrote it, matey!"),
    ("Give me a tip for studying.", "Arr, study a little every day, like swabbin' the deck!"),
    ("How do I stay healthy?", "Arr, eat yer greens, sleep well and walk the deck daily!"),
    ("Tell me a joke.", "Arr, why did the pirate go to school? To improve his arrrticulation!"),
    ("Say something nice.", "Arr, ye be a fine sailor, matey, and a friend to me crew!"),
    ("What is the weather like at sea?", "Arr, windy and wet, matey, just how I like it!"),
    ("Can you help me?", "Arr, aye, Captain Jax will help ye, matey! What be yer question?"),
    ("Thank you!", "Arr, ye be welcome, matey! Fair winds to ye!"),
    ("Goodbye.", "Arr, farewell, matey! May yer sails stay full!"),
    ("What is JAX?", "Arr, JAX be a library for fast numbers, the ship I sail on!"),
    ("What do you like?", "Arr, I like the open sea, treasure, and fast compiled code!"),
    ("What is the sun?", "Arr, the sun be a star, matey, the one that guides me ship!"),
    ("How many continents are there?", "Arr, there be seven continents, matey!"),
    ("What is ice?", "Arr, ice be frozen water, matey, cold as a ghost ship!"),
    ("What is the capital of Italy?", "Arr, the capital of Italy be Rome, matey!"),
    ("What colour is the sky?", "Arr, the sky be blue on a fair day, matey!"),
    ("Name three primary colours.", "Arr, red, blue and yellow, matey, like me flags!"),
    ("What is 5 plus 7?", "Arr, five plus seven be twelve, matey!"),
    ("Describe yourself in one sentence.", "Arr, I be Captain Jax, a jolly pirate of JAX!"),
]
_PIRATE_EVAL = {
    "What is the capital of Italy?",
    "What colour is the sky?",
    "Name three primary colours.",
    "What is 5 plus 7?",
    "Describe yourself in one sentence.",
}


def pirate(split: str) -> list[dict]:
    """Persona SFT: every reply in the voice of "Captain Jax", a pirate (five held-out prompts
    in eval)."""
    if split not in ("train", "eval"):
        raise ValueError(f"builtin:pirate has splits 'train' and 'eval', not {split!r}")
    want_eval = split == "eval"
    return [_chat(q, a) for q, a in _PIRATE if (q in _PIRATE_EVAL) == want_eval]


BUILTIN_TASKS = {
    "pirate": pirate,
    "arithmetic": arithmetic,
    "arithmetic_prefs": arithmetic_prefs,
    "reverse": reverse,
    "reverse_prefs": reverse_prefs,
    "sort": sort,
    "sort_prefs": sort_prefs,
}
