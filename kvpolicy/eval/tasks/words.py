"""Word lists and seeded random values (our own; keys are "adjective-noun")."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterable

_ADJECTIVES = """
able angry bitter black blue bold brave brief bright broad busy calm cheap clean clever cold cool crazy
curly damp dark deep dry dusty eager early easy empty fair fancy fast fierce flat fluffy fresh friendly
funny gentle giant glad golden grand green grumpy happy hard heavy hollow honest huge humble icy jolly
kind large lazy light little lively lonely long loud lucky magic mighty modern narrow neat noisy odd old
pale patient plain polite proud purple quick quiet rapid rare red rich rough round royal rusty sad salty
sharp shiny short shy silent silly slow small smart smooth soft solid sour spicy steep sticky strange
strong sunny super sweet swift tall tame tender thick thin tiny tired tough vast warm wet wide wild wise
wooden young
""".split()
_NOUNS = """
acorn anchor apple arrow badge bakery banana barn basket beach bell bicycle blanket boat bottle bread
bridge brush bucket butter button cabin cactus camera candle canoe canyon carpet castle cherry chimney
circle cloud clover comet compass cookie copper cotton crayon cricket crown crystal desert diamond dragon
drum eagle engine falcon feather fence fiddle flower forest fossil fountain garden garlic giraffe glacier
glove guitar hammer harbor helmet hill honey island jacket jungle kettle kitten ladder lantern lemon
library lizard magnet mango marble meadow mirror monkey mountain muffin needle ocean orchard otter owl
paddle panda parrot pebble pencil pepper piano pillow planet pocket pond puppet puzzle rabbit radio
rainbow river robot rocket saddle sandal scarf shadow shell shovel silver spider spoon squirrel statue
stone sugar tablet teapot tiger tomato tower tractor tulip tunnel turtle umbrella valley violin wagon
walnut window wizard yogurt zebra
""".split()
_WORD_KEYS: tuple[str, ...] = tuple(f"{a}-{n}" for a in _ADJECTIVES for n in _NOUNS)  # ~17k keys


def _rng(*parts: object) -> random.Random:
    """A generator seeded by the parts (string seeding is stable across processes and Python versions)."""
    return random.Random(":".join(map(str, parts)))


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))  # 7 digits


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _distinct(draw: Callable[[], str], n: int, exclude: Iterable[str] = ()) -> list[str]:
    seen = set(exclude)
    out: list[str] = []
    while len(out) < n:
        v = draw()
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out
