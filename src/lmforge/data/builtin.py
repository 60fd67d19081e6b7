"""Offline corpora that lmforge generates itself, so every pipeline runs without a network.

``stories`` writes short, simple children's stories from templates: a main character and a
friend (children or animals, each with a name), a place, the weather, a small problem, some
dialogue in quotes and a happy resolution. The vocabulary is small and the sentence shapes
repeat, which is what lets a tiny character-level model trained for a couple of minutes produce
recognisable English.

``arithmetic`` writes question/answer records ("What is 37 + 48? Answer:" / "85"). GRPO uses
the records as prompts with checkable answers; pretraining uses their text form as documents.

Everything is deterministic for a given seed: the n-th story of ``stories(n, seed)`` does not
depend on ``n`` (a longer corpus extends a shorter one).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator, Sequence

from lmforge.errors import DataError

__all__ = [
    "BUILTIN_VERSION",
    "BUILTIN_CORPORA",
    "ARITHMETIC_OPS",
    "stories",
    "iter_stories",
    "arithmetic",
    "arithmetic_problems",
    "arithmetic_documents",
    "arithmetic_text",
    "builtin_documents",
]

# Bump when a generator's output changes, so token caches built from the old text are rebuilt.
BUILTIN_VERSION = 1


# --------------------------------------------------------------------------------------------
# Word lists
# --------------------------------------------------------------------------------------------

_GIRL_NAMES = [
    "Lily", "Mia", "Emma", "Sara", "Zoe", "Lucy", "Anna", "Rosie", "Daisy", "Ella", "Maya",
    "Nora", "Ruby", "Ivy", "Hannah", "Grace", "Amy", "Chloe", "Lila", "Sophie", "Molly", "Pia",
]
_BOY_NAMES = [
    "Tom", "Ben", "Max", "Leo", "Sam", "Jack", "Finn", "Oliver", "Noah", "Luke", "Timmy",
    "Oscar", "Theo", "Jake", "Billy", "Henry", "Eli", "Milo", "Ollie", "Pete", "Danny", "Kai",
]
_PET_NAMES = [
    "Pip", "Coco", "Bubbles", "Sunny", "Patch", "Nibbles", "Pepper", "Biscuit", "Rusty",
    "Hazel", "Button", "Whiskers", "Ziggy", "Hopper", "Maple", "Toffee", "Bluebell", "Twig",
]

# Animal kinds the characters can be; children are "girl" / "boy".
_ANIMALS = [
    "rabbit", "bunny", "cat", "kitten", "dog", "puppy", "bear", "fox", "owl", "duck", "frog",
    "mouse", "squirrel", "hedgehog", "turtle", "lion", "elephant", "pig", "horse", "bird",
    "deer", "goat", "monkey", "penguin", "panda", "lamb", "hen", "otter", "tiger", "badger",
]

_CHAR_ADJS = [
    "little", "brave", "curious", "shy", "kind", "clever", "sleepy", "happy", "tiny", "fluffy",
    "old", "gentle", "playful", "busy", "friendly", "funny", "quiet", "small", "young", "smart",
]

_KID_ADJS = [
    "little", "brave", "curious", "shy", "kind", "clever", "sleepy", "happy", "tiny", "gentle",
    "playful", "busy", "friendly", "funny", "quiet", "small", "young", "smart", "cheerful",
]

_PLACES = [
    {
        "name": "the forest",
        "in": "in a big green forest",
        "spots": ["under an old oak tree", "behind a mossy log", "next to a little stream",
                  "in a pile of leaves", "near a big rock", "beside a bush full of berries"],
        "sight": "The trees were tall and the birds were singing.",
        "high": "a tall tree",
    },
    {
        "name": "the farm",
        "in": "on a sunny farm",
        "spots": ["in the hay", "behind the red barn", "next to the water trough",
                  "under the wooden cart", "near the chicken coop", "by the old fence"],
        "sight": "There were cows in the field and chickens in the yard.",
        "high": "the roof of the barn",
    },
    {
        "name": "the village",
        "in": "in a small village",
        "spots": ["under a bench", "behind the bakery", "next to the well",
                  "near the little bridge", "by the flower shop", "in the town square"],
        "sight": "The houses had red roofs and the streets were made of stone.",
        "high": "a high wall",
    },
    {
        "name": "the park",
        "in": "near a big park",
        "spots": ["under the slide", "behind a tree", "in the sandbox", "next to the swings",
                  "by the duck pond", "under a park bench"],
        "sight": "Children were playing on the swings and the grass was soft.",
        "high": "a tall tree",
    },
    {
        "name": "the beach",
        "in": "by the sea",
        "spots": ["behind a sand castle", "under a big umbrella", "near the rocks",
                  "in a tide pool", "next to a boat", "by the old pier"],
        "sight": "The waves were splashing and the sand was warm.",
        "high": "a tall rock",
    },
    {
        "name": "the garden",
        "in": "in a house with a lovely garden",
        "spots": ["under the rose bush", "behind the watering can", "next to the carrots",
                  "in the flower bed", "by the garden gate", "under a big leaf"],
        "sight": "There were red tulips, yellow sunflowers and busy bees.",
        "high": "the top of the shed",
    },
    {
        "name": "the meadow",
        "in": "in a wide meadow",
        "spots": ["in the tall grass", "under a daisy", "behind a hill", "next to a pond",
                  "near an old stump", "by a stone wall"],
        "sight": "The grass was green and there were flowers everywhere.",
        "high": "a tall tree",
    },
    {
        "name": "the mountain",
        "in": "at the foot of a big mountain",
        "spots": ["behind a big stone", "in a small cave", "under a pine tree",
                  "next to a waterfall", "near the path", "by a cold stream"],
        "sight": "The air was fresh and the sky was very big.",
        "high": "a high ledge",
    },
    {
        "name": "the jungle",
        "in": "in a warm jungle",
        "spots": ["under a giant leaf", "behind a vine", "next to a river",
                  "in a hollow tree", "near a big flower", "by a muddy pool"],
        "sight": "Colorful parrots flew between the tall trees.",
        "high": "a tall palm tree",
    },
    {
        "name": "the town",
        "in": "in a busy town",
        "spots": ["under a car", "behind the library", "next to the post office",
                  "near the fountain", "by the bus stop", "in the school yard"],
        "sight": "People were walking and the shops were open.",
        "high": "a high shelf in the shop",
    },
]

# (noun, possible colours); colour "" means no colour word.
_OBJECTS = [
    ("ball", ["red", "blue", "green", "yellow", "striped"]),
    ("kite", ["red", "blue", "orange", "purple"]),
    ("hat", ["red", "blue", "green", "yellow", "funny"]),
    ("book", ["blue", "green", "little", "favorite"]),
    ("toy boat", ["red", "blue", "little", "wooden"]),
    ("blanket", ["soft", "warm", "blue", "pink"]),
    ("shell", ["pink", "shiny", "white", "little"]),
    ("drum", ["red", "little", "loud", "shiny"]),
    ("teddy bear", ["brown", "soft", "old", "little"]),
    ("scarf", ["red", "warm", "striped", "green"]),
    ("crayon", ["blue", "green", "purple", "yellow"]),
    ("whistle", ["silver", "shiny", "little"]),
    ("toy car", ["red", "fast", "little", "blue"]),
    ("doll", ["pretty", "little", "old", "favorite"]),
    ("basket", ["brown", "little", "woven"]),
    ("bell", ["golden", "shiny", "little"]),
]

_FRUITS = [
    ("apple", "red"), ("pear", "green"), ("plum", "purple"), ("orange", "big"),
    ("peach", "soft"), ("cherry", "red"), ("banana", "yellow"), ("coconut", "big"),
]

_FOODS = ["cookies", "berries", "carrots", "cupcakes", "apples", "nuts", "sandwiches", "grapes"]

_WEATHER = {
    "sunny": [
        "The sun was shining and the sky was blue.",
        "It was a warm and sunny day.",
        "The sun was bright and the air was warm.",
    ],
    "rainy": [
        "It was a rainy day, and there were puddles everywhere.",
        "Soft rain was falling from the gray sky.",
        "The rain went pitter-patter on the roofs.",
    ],
    "windy": [
        "It was a windy day, and the leaves were dancing in the air.",
        "A strong wind was blowing.",
        "The wind was whistling through the trees.",
    ],
    "snowy": [
        "It was a cold day, and snow covered the ground like a white blanket.",
        "Snowflakes were falling softly from the sky.",
        "Everything was white with fresh snow.",
    ],
    "cloudy": [
        "The sky was gray and full of clouds.",
        "It was a cloudy day, but it was not cold.",
        "Big white clouds were floating in the sky.",
    ],
}

_ACTIVITIES = [
    "play outside", "sing songs", "draw pictures", "read books", "run and jump",
    "look at the stars", "build towers with blocks", "pick flowers", "dance",
    "play hide and seek", "splash in puddles", "climb trees", "make new friends",
    "bake cakes", "tell jokes", "watch the clouds", "collect shiny stones",
]

# Things friends do together outside (used where "going somewhere to ..." must make sense).
_OUTDOOR_ACTIVITIES = [
    "pick flowers", "play hide and seek", "collect shiny stones", "watch the clouds",
    "climb trees", "run and jump", "splash in puddles", "look for butterflies", "fly a kite",
    "play ball",
]

_TIME_STARTS = ["One day", "One morning", "One afternoon", "One evening", "Later that day",
                "After lunch", "The next day", "Soon"]


def _a(word: str) -> str:
    """``word`` with its indefinite article ("an owl", "a little owl")."""
    return ("an " if word[0].lower() in "aeio" else "a ") + word


class _Char:
    """A story character; templates use ``{A}`` (the name), ``{A.He}``, ``{A.his}``, ..."""

    def __init__(self, name: str, kind: str, adj: str, female: bool):
        self.name = name
        self.kind = kind
        self.adj = adj
        self.he = "she" if female else "he"
        self.him = "her" if female else "him"
        self.his = "her" if female else "his"
        self.He = self.he.capitalize()
        self.His = self.his.capitalize()
        self.poss = name + "'s"
        self.desc = _a(f"{adj} {kind}")  # "a little rabbit"

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)


def _make_char(rng: random.Random, avoid: str | None = None, avoid_kind: str | None = None
               ) -> _Char:
    roll = rng.random()
    if roll < 0.3:
        female = rng.random() < 0.5
        kind = "girl" if female else "boy"
        pool = _GIRL_NAMES if female else _BOY_NAMES
    else:
        kind = rng.choice([k for k in _ANIMALS if k != avoid_kind])
        female = rng.random() < 0.5
        pool = _PET_NAMES + (_GIRL_NAMES if female else _BOY_NAMES)
    name = rng.choice([n for n in pool if n != avoid])
    adj = rng.choice(_KID_ADJS if kind in ("girl", "boy") else _CHAR_ADJS)
    return _Char(name, kind, adj, female)


# --------------------------------------------------------------------------------------------
# Story parts. Each problem returns (setup, dialogue, resolution, ending) sentence lists; the
# builder decides which optional sentences to keep so a story has 4-10 sentences.
# --------------------------------------------------------------------------------------------


def _problem_lost(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    obj, colors = rng.choice(_OBJECTS)
    color = rng.choice(colors)
    thing = f"{color} {obj}"
    s1, s2, s3 = rng.sample(place["spots"], 3)
    setup = rng.choice([
        [f"{ctx['when']}, {A} could not find {A.his} {thing}."],
        [f"{ctx['when']}, {A} lost {A.his} {thing} while playing in {place['name']}."],
        [f"{A} had {_a(thing)} that {A.he} loved very much.",
         f"{ctx['when']}, the {obj} was gone!"],
    ])
    feeling = rng.choice([f"{A} felt very sad.", f"{A} was worried.",
                          f"{A} sat down and began to cry."])
    dialogue = rng.choice([
        f"\"Have you seen my {obj}?\" {A} asked {B}.",
        f"\"Where is my {obj}?\" cried {A}.",
        f"\"I lost my {thing},\" {A} said to {B}.",
    ])
    answer = rng.choice([
        f"\"Don't worry, I will help you look,\" said {B}.",
        f"\"Let's look for it together,\" said {B}.",
        f"{B} smiled and said, \"We will find it.\"",
    ])
    resolution = [
        f"They looked {s1} and {s2}.",
        rng.choice([f"At last, {B} found the {obj} {s3}.",
                    f"Then {A} saw something {color} {s3}. It was the {obj}!",
                    f"Finally, they found the {obj} {s3}."]),
    ]
    ending = rng.choice([
        [f"\"Thank you, {B}!\" said {A}, and {A.he} gave {B} a big hug."],
        [f"{A} was so happy.", f"{A.He} held the {obj} tight and said, \"Thank you, {B}!\""],
        [f"{A} smiled from ear to ear.",
         "From that day on, the two friends always played together."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": [dialogue, answer],
            "resolution": resolution, "ending": ending}


def _problem_scared(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    fear, calm = rng.choice([
        ("a loud storm", "the storm was over"),
        ("a big thunderstorm", "the thunder went away"),
        ("a strange noise outside", "they saw that the noise was only the wind"),
        ("a long dark night", "the sun came up"),
    ])
    setup = rng.choice([
        [f"That night, there was {fear}."],
        [f"{ctx['when']}, {A} heard {fear}." if "noise" in fear
         else f"In the evening, there was {fear}."],
    ])
    feeling = rng.choice([f"{A} was very scared.", f"{A} hid under {A.his} blanket.",
                          f"{A} felt small and afraid."])
    dialogue = [
        rng.choice([f"\"I am scared,\" {A} whispered.",
                    f"\"I don't like this,\" said {A}.",
                    f"\"Can you stay with me?\" {A} asked {B}."]),
        rng.choice([f"{B} held {A.poss} hand and said, \"Do not be afraid. I am here with you.\"",
                    f"\"It is okay,\" said {B}. \"We are safe inside.\"",
                    f"{B} said, \"Let's be brave together.\""]),
    ]
    resolution = [rng.choice([
        f"They sang a happy song together until {calm}.",
        f"{B} told {A} a funny story, and they laughed until {calm}.",
        f"They made a cozy fort with pillows and waited until {calm}.",
    ])]
    ending = rng.choice([
        [f"Soon {A} was not scared anymore."],
        [f"{A} felt brave and happy.", f"\"Thank you for being my friend,\" {A} said."],
        [f"In the morning, {A} and {B} played outside again."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": dialogue,
            "resolution": resolution, "ending": ending}


def _problem_reach(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    fruit, fadj = rng.choice(_FRUITS)
    high = place["high"]
    setup = [
        f"{ctx['when']}, {A} saw {_a(fadj + ' ' + fruit)} on {high}.",
        rng.choice([f"{A.He} jumped and jumped, but {A.he} could not reach it.",
                    f"{A.He} tried to climb up, but it was too high.",
                    f"{A.He} stretched as far as {A.he} could, but it was no use."]),
    ]
    feeling = rng.choice([f"{A} felt sad.", f"{A} was hungry and a little grumpy.",
                          f"{A} sighed."])
    dialogue = [
        rng.choice([f"\"Can you help me, {B}?\" asked {A}.",
                    f"\"I want that {fruit},\" {A} said to {B}."]),
        rng.choice([f"\"I have an idea,\" said {B}.",
                    f"\"Let's work together,\" said {B}."]),
    ]
    resolution = [rng.choice([
        f"{B} found a long stick, and together they knocked the {fruit} down.",
        f"{A} stood on {B.poss} back and picked the {fruit}.",
        f"{B} brought a little ladder, and {A} climbed up and got the {fruit}.",
    ])]
    ending = rng.choice([
        [f"They shared the {fruit}, and it was sweet and juicy."],
        [f"{A} gave half of the {fruit} to {B}.", "Working together made it easy."],
        ["\"We did it!\" they shouted.", f"It was the best {fruit} {A} had ever eaten."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": dialogue,
            "resolution": resolution, "ending": ending}


def _problem_broken(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    obj, colors = rng.choice([o for o in _OBJECTS
                              if o[0] in ("kite", "toy boat", "drum", "toy car", "doll",
                                          "basket", "hat", "teddy bear")])
    color = rng.choice(colors)
    how = {"kite": "got stuck in a tree and tore", "toy boat": "hit a rock and cracked",
           "drum": "fell off the table and broke", "toy car": "lost one of its wheels",
           "doll": "lost one of its arms", "basket": "got a big hole in the bottom",
           "hat": "got a big rip", "teddy bear": "lost one of its eyes"}[obj]
    setup = [f"{ctx['when']}, {A.poss} {color} {obj} {how}."]
    feeling = rng.choice([f"{A} began to cry.", f"{A} felt very sad.",
                          f"{A} did not know what to do."])
    dialogue = [
        rng.choice([f"\"My {obj} is broken!\" cried {A}.",
                    f"\"Oh no, look at my {obj},\" said {A}."]),
        rng.choice([f"\"Don't cry,\" said {B}. \"We can fix it.\"",
                    f"{B} looked at the {obj} and said, \"I know how to fix it.\""]),
    ]
    resolution = [rng.choice([
        f"{B} found some glue and tape, and they fixed the {obj} together.",
        f"They worked all afternoon, and the {obj} was as good as new.",
        f"{B.poss} grandma helped them, and soon the {obj} was fixed.",
    ])]
    ending = rng.choice([
        [f"{A} was happy again.", f"\"You are a good friend, {B},\" {A.he} said."],
        [f"{A} and {B} played with the {obj} until it was time for dinner."],
        [f"{A} learned that a broken thing can often be fixed."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": dialogue,
            "resolution": resolution, "ending": ending}


def _problem_share(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    food = rng.choice(_FOODS)
    setup = [
        f"{ctx['when']}, {A} had a big basket of {food}.",
        f"{B} looked at the {food} and felt hungry.",
    ]
    feeling = f"At first, {A} did not want to share."
    dialogue = [
        rng.choice([f"\"Can I have some, please?\" asked {B}.",
                    f"\"Those {food} look yummy,\" said {B}."]),
        rng.choice([f"{A} thought for a moment and said, \"Yes, let's share them.\"",
                    f"\"Here, you can have half,\" said {A} with a smile."]),
    ]
    resolution = [rng.choice([
        f"They sat down together and ate the {food}.",
        f"{A} and {B} shared the {food} under a tree.",
        f"They ate the {food} and talked and laughed.",
    ])]
    ending = rng.choice([
        ["Sharing made them both happy."],
        [f"{A} learned that sharing is better than eating alone."],
        [f"The {food} tasted even better with a friend.", "It was a wonderful day."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": dialogue,
            "resolution": resolution, "ending": ending}


def _problem_way_home(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    spot = rng.choice(place["spots"])
    setup = [
        f"{ctx['when']}, {A} went far away from home to {rng.choice(_OUTDOOR_ACTIVITIES)}.",
        f"When {A.he} looked around, {A.he} could not find the way home.",
    ]
    feeling = rng.choice([f"{A} felt lost and lonely.", f"{A} was scared and tired."])
    dialogue = [
        rng.choice([f"\"Where am I?\" {A} said.", f"\"Help! I am lost!\" called {A}."]),
        rng.choice([f"{B} heard {A.him} and said, \"I know the way. Follow me.\"",
                    f"\"Don't worry, I will take you home,\" said {B}."]),
    ]
    resolution = [f"{B} led {A} back home, and on the way they rested {spot}."]
    ending = rng.choice([
        [f"{A.poss} mom gave {A.him} a warm hug.", f"\"Thank you, {B},\" said {A}."],
        [f"{A} was safe and happy.", f"After that, {A.he} always stayed close to home."],
        [f"{A} thanked {B}, and they became best friends."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": dialogue,
            "resolution": resolution, "ending": ending}


def _problem_bird(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    baby, home = rng.choice([("baby bird", "its nest"), ("little duckling", "its mother"),
                             ("small kitten", "its basket"), ("tiny snail", "its leaf")])
    setup = [
        f"{ctx['when']}, {A} heard a small cry.",
        f"{_a(baby).capitalize()} was all alone and could not find {home}.",
    ]
    feeling = rng.choice([f"{A} felt sorry for the {baby}.", f"{A} wanted to help."])
    dialogue = [
        rng.choice([f"\"We have to help it,\" {A} said to {B}.",
                    f"\"Poor little thing,\" said {A}."]),
        rng.choice([f"\"Let's be very gentle,\" said {B}.", f"\"I will help you,\" said {B}."]),
    ]
    resolution = [rng.choice([
        f"{A} and {B} carefully took the {baby} back to {home}.",
        f"They looked everywhere until they found {home}, and they brought the {baby} there.",
    ])]
    ending = rng.choice([
        [f"The {baby} was safe again.", f"{A} and {B} felt proud and happy."],
        [f"Everyone was happy, and {A} smiled all day."],
        ["It felt good to help.", f"{A} and {B} went home with happy hearts."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": dialogue,
            "resolution": resolution, "ending": ending}


def _problem_shy(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    act = rng.choice(_OUTDOOR_ACTIVITIES)
    setup = [
        f"{ctx['when']}, {A} saw some friends who were about to {act}.",
        f"{A} wanted to join them, but {A.he} was too shy.",
    ]
    feeling = rng.choice([f"{A} felt lonely.", f"{A} stood all alone and felt a little sad."])
    dialogue = [
        rng.choice([f"{B} came over and asked, \"Do you want to play with us?\"",
                    f"\"Come and play, {A}!\" called {B}."]),
        rng.choice([f"\"Yes, please,\" said {A} quietly.", f"\"Really? Thank you!\" said {A}."]),
    ]
    resolution = [f"{A} joined them, and they all had fun together."]
    ending = rng.choice([
        [f"{A} was not shy anymore."],
        [f"That day, {A} made many new friends.", "It was the best day ever."],
        [f"{A} learned that saying hello is the first step to a new friend."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": dialogue,
            "resolution": resolution, "ending": ending}


def _problem_picnic(rng: random.Random, A: _Char, B: _Char, place: dict, ctx: dict) -> dict:
    food = rng.choice(_FOODS)
    setup = [
        f"{ctx['when']}, {A} and {B} wanted to have a picnic with {food}.",
        rng.choice(["But then dark clouds came, and it started to rain.",
                    "Just as they sat down, big drops of rain began to fall."]),
    ]
    feeling = f"{A} was sad because the picnic was spoiled."
    dialogue = [
        rng.choice([f"\"Now we cannot have our picnic,\" said {A}.",
                    f"\"Oh no, what can we do?\" asked {A}."]),
        rng.choice([f"\"We can have a picnic inside!\" said {B}.",
                    f"{B} smiled and said, \"I have a good idea.\""]),
    ]
    resolution = [rng.choice([
        f"They put a blanket on the floor and ate the {food} inside.",
        "They built a tent from chairs and blankets, and they had the picnic in it.",
    ])]
    ending = rng.choice([
        [f"Listening to the rain, they ate all the {food}.", "It was the best picnic ever."],
        ["When the rain stopped, they saw a big rainbow."],
        [f"{A} learned that a rainy day can still be a fun day."],
    ])
    return {"setup": setup, "feeling": feeling, "dialogue": dialogue,
            "resolution": resolution, "ending": ending}


_PROBLEMS: list[Callable[..., dict]] = [
    _problem_lost, _problem_scared, _problem_reach, _problem_broken, _problem_share,
    _problem_way_home, _problem_bird, _problem_shy, _problem_picnic,
]


def _opening(rng: random.Random, A: _Char, place: dict) -> str:
    return rng.choice([
        f"Once upon a time, there was {A.desc} named {A}.",
        f"Once upon a time, {A.desc} named {A} lived {place['in']}.",
        f"There once was {A.desc} named {A}.",
        f"{A} was {A.desc} who lived {place['in']}.",
        f"Long ago, {place['in']}, there lived {A.desc} named {A}.",
    ])


def _friend_intro(rng: random.Random, A: _Char, B: _Char) -> str:
    return rng.choice([
        f"{A.His} best friend was {B}, {B.desc}.",
        f"{A} had a good friend named {B}, who was {B.desc}.",
        f"{A} often played with {B}, {B.desc} who lived nearby.",
        f"{A} and {B} the {B.kind} were best friends." if B.kind not in ("girl", "boy")
        else f"{A} and {A.his} friend {B} were always together.",
    ])


_SENTENCE_END = re.compile(r'[.!?]"?(?=\s|$)')


def _count_sentences(parts: list[str]) -> int:
    """Sentences in ``parts`` (a quoted "Hello," said A. "Come in." counts as two)."""
    return sum(len(_SENTENCE_END.findall(p)) for p in parts)


def _story(rng: random.Random) -> str:
    A = _make_char(rng)
    B = _make_char(rng, avoid=A.name, avoid_kind=A.kind)
    place = rng.choice(_PLACES)
    weather = rng.choice(list(_WEATHER))
    problem = rng.choice(_PROBLEMS)
    ctx = {"when": rng.choice(_TIME_STARTS)}
    parts = problem(rng, A, B, place, ctx)

    # Optional sentences, each kept with some probability.
    likes = rng.choice([f"{A} loved to {rng.choice(_ACTIVITIES)}.",
                        f"{A.He} liked to {rng.choice(_ACTIVITIES)} every day.",
                        f"More than anything, {A} loved to {rng.choice(_ACTIVITIES)}."])
    opening = [_opening(rng, A, place)]
    extras_before = []
    if rng.random() < 0.4:
        extras_before.append(likes)
    if rng.random() < 0.3:
        extras_before.append(place["sight"])
    weather_line = [rng.choice(_WEATHER[weather])] if (
        problem not in (_problem_picnic, _problem_scared) and rng.random() < 0.4) else []
    friend = [_friend_intro(rng, A, B)]
    feeling = [parts["feeling"]] if rng.random() < 0.6 else []
    dialogue = parts["dialogue"] if rng.random() < 0.85 else parts["dialogue"][:0]

    ending = list(parts["ending"])

    def assemble() -> list[str]:
        return (opening + extras_before + friend + weather_line + parts["setup"] + feeling
                + dialogue + parts["resolution"] + ending)

    sentences = assemble()
    # Keep at most 10 sentences: drop optional ones (least important first) while too long.
    while _count_sentences(sentences) > 10:
        if extras_before:
            extras_before.pop()
        elif weather_line:
            weather_line = []
        elif feeling:
            feeling = []
        elif len(ending) > 1:
            ending = ending[:1]
        elif len(dialogue) > 1:
            dialogue = dialogue[:1]
        elif dialogue:
            dialogue = []
        else:  # pragma: no cover - the longest combination fits once the optional parts go
            break
        sentences = assemble()
    return " ".join(sentences)


def iter_stories(n: int, seed: int = 0) -> Iterator[str]:
    """Yield ``n`` generated children's stories, deterministic for ``seed``."""
    if not isinstance(n, int) or n < 0:
        raise DataError(f"builtin:stories: n must be a non-negative integer, got {n!r}")
    rng = random.Random(f"lmforge-stories-{seed}")
    for _ in range(n):
        yield _story(rng)


def stories(n: int, seed: int = 0) -> list[str]:
    """``n`` generated children's stories (4-10 sentences each), deterministic for ``seed``."""
    return list(iter_stories(n, seed))


# --------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------

ARITHMETIC_OPS = _OPS = ("+", "-", "*", "/")


def arithmetic(
    n: int,
    seed: int = 0,
    max_operand: int = 99,
    ops: Sequence[str] = ("+", "-", "*"),
) -> list[dict]:
    """``n`` arithmetic records ``{"prompt": "What is 37 + 48? Answer:", "answer": "85"}``.

    Operands are drawn uniformly from ``0..max_operand``. Subtraction puts the larger operand
    first so answers are never negative; division ("/") is generated as an exact quotient with
    a non-zero divisor. Deterministic for ``seed``.
    """
    if not isinstance(n, int) or n < 0:
        raise DataError(f"builtin:arithmetic: n must be a non-negative integer, got {n!r}")
    if not isinstance(max_operand, int) or max_operand < 1:
        raise DataError(f"builtin:arithmetic: max_operand must be an integer >= 1, "
                        f"got {max_operand!r}")
    ops = tuple(ops)
    bad = [o for o in ops if o not in _OPS]
    if not ops or bad:
        raise DataError(f"builtin:arithmetic: ops must be a non-empty subset of {' '.join(_OPS)}, "
                        f"got {list(ops)!r}")
    rng = random.Random(f"lmforge-arithmetic-{seed}")
    records = []
    for _ in range(n):
        op = rng.choice(ops)
        a = rng.randint(0, max_operand)
        b = rng.randint(0, max_operand)
        if op == "+":
            result = a + b
        elif op == "-":
            a, b = max(a, b), min(a, b)
            result = a - b
        elif op == "*":
            result = a * b
        else:  # exact division: a = b * q
            b = rng.randint(1, max_operand)
            q = rng.randint(0, max_operand // b)
            a = b * q
            result = q
        records.append({"prompt": f"What is {a} {op} {b}? Answer:", "answer": str(result)})
    return records


# Name used by the GRPO side: records with a prompt and a checkable answer.
arithmetic_problems = arithmetic


def arithmetic_text(record: dict) -> str:
    """The document form of a record: ``"What is 37 + 48? Answer: 85"``."""
    return f"{record['prompt']} {record['answer']}"


def arithmetic_documents(n: int, seed: int = 0, max_operand: int = 99,
                         ops: Sequence[str] = ("+", "-", "*")) -> list[str]:
    """``arithmetic(...)`` as text documents (one problem with its answer per document)."""
    return [arithmetic_text(r) for r in arithmetic(n, seed, max_operand, ops)]


# --------------------------------------------------------------------------------------------
# Registry used by sources.py ("builtin:<name>")
# --------------------------------------------------------------------------------------------

BUILTIN_CORPORA: dict[str, Callable[..., Iterator[str] | list[str]]] = {
    "stories": iter_stories,
    "arithmetic": arithmetic_documents,
}


def builtin_documents(name: str, n: int, seed: int = 0, **options) -> Iterator[str]:
    """Documents of the built-in corpus ``name`` ("stories" or "arithmetic"); ``options`` are
    the generator's own (arithmetic: ``max_operand``, ``ops``)."""
    if name not in BUILTIN_CORPORA:
        raise DataError(f"builtin:{name}: unknown built-in corpus; expected one of "
                        f"{', '.join('builtin:' + k for k in BUILTIN_CORPORA)}")
    yield from BUILTIN_CORPORA[name](n, seed, **options)
